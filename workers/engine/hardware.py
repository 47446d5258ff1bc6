"""Hardware profiles as data: what the estimator needs to know about a device.

Pure Python (no torch, no Django): the web tier imports it to estimate, the worker to say which profile its
device is. Figures are vendor peaks for dense math (no sparsity), except ``cpu``, which was measured on this
platform's reference machine (2 cores of an Intel Xeon with AMX, Debian 12, torch 2.13: a 1024² fp32 matmul
reaches 135–220 GFLOP/s, bf16 through AMX about 1 TFLOP/s, a large ``numpy.copyto`` 18 GB/s). A profile's
``efficiency`` is the fraction of peak that a whole training step of a small-to-medium transformer reaches
(model FLOPs utilisation); a measured step time on a worker replaces guesses through a calibration factor
(see ``workers.engine.estimate.estimate``).

fp32 peaks on NVIDIA GPUs are plain FP32, not TF32: PyTorch leaves TF32 matmuls off by default.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")

GB = 10**9  # vendors state memory and bandwidth in decimal units
# PyTorch's CUDA caching allocator rounds blocks and keeps freed ones cached by size; 10% over the live
# activations is the usual fragmentation of a training step (not measured here: no GPU on this machine).
GPU_ALLOCATOR_OVERHEAD = 1.10
# Eager PyTorch issues roughly a hundred kernels per layer for forward and backward, ~10 µs each from Python:
# about 1 ms per layer per micro-batch that a tiny model cannot hide (not measured here either).
GPU_LAYER_OVERHEAD_SECONDS = 0.001


@dataclass(frozen=True)
class HardwareProfile:
    """One device type. ``peak_flops[p]`` is None when precision ``p`` is not supported for training."""

    key: str
    name: str
    kind: Literal["cpu", "gpu"]
    memory_bytes: int  # what a training process can use on one device
    bandwidth_bytes_per_s: float  # main-memory bandwidth of one device
    peak_flops: dict[str, float | None]  # FLOP/s of dense matmuls per precision
    efficiency: float  # fraction of the matmul peak a training step reaches, before calibration
    reserved_bytes: int  # taken before any tensor: CUDA context and allocator slack, or the Python process
    # Memory an allocator holds per byte of activations: freed blocks that later requests of other sizes
    # cannot reuse, and backward's working set of activation gradients.
    activation_overhead: float
    # Seconds per layer per micro-batch (forward and backward) spent dispatching operations whatever their
    # size: what dominates a tiny model's step.
    layer_overhead_seconds: float
    max_devices: int  # how many of them one job may use
    device_names: tuple[str, ...] = field(default=())  # lower-case substrings of torch's device name
    notes: str = ""

    def supports(self, precision: str) -> bool:
        return self.peak_flops.get(precision) is not None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["device_names"] = list(self.device_names)
        return out


def _physical_memory_bytes() -> int:
    """RAM of this machine (the CPU profile's memory); 16 GB when the platform does not tell."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GB


def _cpu_profile() -> HardwareProfile:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Per-core figures measured on the reference machine (module docstring); the worker's calibration corrects
    # them on another CPU. fp16 autocast on CPU is not offered: the spec reserves fp16 for CUDA.
    return HardwareProfile(
        key="cpu",
        name=f"This CPU ({cores} core{'s' if cores != 1 else ''})",
        kind="cpu",
        memory_bytes=_physical_memory_bytes(),
        bandwidth_bytes_per_s=9 * GB * min(cores, 8),
        peak_flops={"fp32": 110e9 * cores, "bf16": 500e9 * cores, "fp16": None},
        # Fitted to the step times of seven MoE shapes (0.9M-17M parameters, 1k-16k tokens per step) on the
        # reference machine: predictions within ±20% of each other's measured/predicted ratio.
        efficiency=0.7,
        layer_overhead_seconds=0.0005,
        # The process itself: Python with torch imported (~230 MiB resident) and the ~95 MiB that its kernels
        # allocate on first use (thread pools, oneDNN), measured as a run's peak RSS with a negligible model.
        reserved_bytes=int(0.34 * GB),
        # glibc's heap: a run's peak RSS exceeded W + G + O + saved activations by 13-19% of the activations
        # (fp32, 1-8 layers, batch 1-32, measured on the reference machine).
        activation_overhead=1.15,
        # One training process per core at most (torch.distributed over gloo): the processes share the cores.
        max_devices=cores,
        notes="Measured on this platform's machine; fp16 needs CUDA. Calibrate with a short run on the worker.",
    )


CPU = _cpu_profile()

PROFILES: dict[str, HardwareProfile] = {
    p.key: p
    for p in (
        CPU,
        HardwareProfile(
            key="t4",
            name="NVIDIA T4 16 GB",
            kind="gpu",
            memory_bytes=16 * GB,
            bandwidth_bytes_per_s=320 * GB,
            # Turing has no bf16 tensor cores: bf16 autocast would be emulated and slow, so it is not offered.
            peak_flops={"fp32": 8.1e12, "bf16": None, "fp16": 65e12},
            efficiency=0.35,
            reserved_bytes=int(0.6 * GB),
            activation_overhead=GPU_ALLOCATOR_OVERHEAD,
            layer_overhead_seconds=GPU_LAYER_OVERHEAD_SECONDS,
            max_devices=8,
            device_names=("t4",),
            notes="No bf16: train in fp16 (with a gradient scaler) or fp32.",
        ),
        HardwareProfile(
            key="a10",
            name="NVIDIA A10 24 GB",
            kind="gpu",
            memory_bytes=24 * GB,
            bandwidth_bytes_per_s=600 * GB,
            peak_flops={"fp32": 31.2e12, "bf16": 125e12, "fp16": 125e12},
            efficiency=0.4,
            reserved_bytes=int(0.7 * GB),
            activation_overhead=GPU_ALLOCATOR_OVERHEAD,
            layer_overhead_seconds=GPU_LAYER_OVERHEAD_SECONDS,
            max_devices=8,
            device_names=("a10",),
        ),
        HardwareProfile(
            key="a100-40gb",
            name="NVIDIA A100 40 GB",
            kind="gpu",
            memory_bytes=40 * GB,
            bandwidth_bytes_per_s=1555 * GB,
            peak_flops={"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12},
            efficiency=0.4,
            reserved_bytes=int(0.8 * GB),
            activation_overhead=GPU_ALLOCATOR_OVERHEAD,
            layer_overhead_seconds=GPU_LAYER_OVERHEAD_SECONDS,
            max_devices=8,
            device_names=("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40gb"),
        ),
        HardwareProfile(
            key="a100-80gb",
            name="NVIDIA A100 80 GB",
            kind="gpu",
            memory_bytes=80 * GB,
            bandwidth_bytes_per_s=2039 * GB,
            peak_flops={"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12},
            efficiency=0.4,
            reserved_bytes=int(0.8 * GB),
            activation_overhead=GPU_ALLOCATOR_OVERHEAD,
            layer_overhead_seconds=GPU_LAYER_OVERHEAD_SECONDS,
            max_devices=8,
            device_names=("a100-sxm4-80gb", "a100 80gb", "a100-pcie-80gb"),
        ),
        HardwareProfile(
            key="h100-80gb",
            name="NVIDIA H100 80 GB",
            kind="gpu",
            memory_bytes=80 * GB,
            bandwidth_bytes_per_s=3350 * GB,
            peak_flops={"fp32": 67e12, "bf16": 989e12, "fp16": 989e12},
            efficiency=0.35,
            reserved_bytes=int(1.0 * GB),
            activation_overhead=GPU_ALLOCATOR_OVERHEAD,
            layer_overhead_seconds=GPU_LAYER_OVERHEAD_SECONDS,
            max_devices=8,
            device_names=("h100",),
            notes="SXM figures; a PCIe H100 is about 20% slower.",
        ),
    )
}


def get_profile(key: str) -> HardwareProfile:
    """The profile called ``key``; ``KeyError`` naming the known keys otherwise."""
    try:
        return PROFILES[key]
    except KeyError:
        raise KeyError(f"unknown hardware profile {key!r}; known: {', '.join(PROFILES)}") from None


def profile_for_device(device_type: str, device_name: str = "") -> HardwareProfile | None:
    """The profile of a torch device: ``("cpu", _)`` is ``cpu``; a CUDA device is matched by its name
    (``torch.cuda.get_device_name()``, e.g. ``"NVIDIA A100-SXM4-80GB"``); None for an unknown GPU."""
    if device_type == "cpu":
        return CPU
    lowered = device_name.lower()
    # Longest fragment first: "a10" is a substring of every A100's name.
    candidates = sorted(
        ((fragment, profile) for profile in PROFILES.values() for fragment in profile.device_names),
        key=lambda pair: -len(pair[0]),
    )
    for fragment, profile in candidates:
        if fragment in lowered:
            return profile
    return None
