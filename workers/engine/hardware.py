"""Hardware profiles as data: what the estimator needs to know about a device.

Pure Python (no torch, no Django): the web tier imports it to estimate, the worker to say which profile its
device is. Figures are vendor peaks for dense math (no sparsity), except ``cpu``, which was measured on this
platform's reference machine (2 cores of an Intel Xeon with AMX, Debian 12, torch 2.13: a 1024² fp32 matmul
reaches 135–390 GFLOP/s depending on the day, bf16 through AMX about 3.8 times the fp32 rate measured beside it, a
large ``numpy.copyto`` 18 GB/s). The CPU profile offers bf16 only where the CPU multiplies bf16 natively (AVX-512
BF16 or AMX, read from ``/proc/cpuinfo``: ``cpu_bf16_units``); elsewhere oneDNN emulates it, slower than fp32.
A worker measures its own CPU's rates when it starts (``workers.engine.probe``), and ``cpu_profile(rates=...)``
puts them in place of the reference machine's (the web tier does so with its live workers' rates:
``builder.core.profiles``).
A profile's ``efficiency`` is the fraction of peak that a whole training step of a small-to-medium transformer
reaches (model FLOPs utilisation); a measured step time on a worker replaces guesses through a calibration factor
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
    # size: what dominates a tiny model's step. The estimator counts calls (workers.engine.estimate,
    # dispatch_operations) and charges this per reference MoE layer's worth (_REFERENCE_LAYER_OPS calls).
    layer_overhead_seconds: float
    max_devices: int  # how many of them one job may use
    device_names: tuple[str, ...] = field(default=())  # lower-case substrings of torch's device name
    notes: str = ""
    # The model width (hidden size) from which a step's matmuls reach ``efficiency``; a narrower model's reach
    # ``efficiency * sqrt(width / full_speed_width)``: short contracted dimensions, small tiles and more of the
    # step in the kernels' edges. 0: no such dependence (the GPU profiles: not measured).
    full_speed_width: int = 0
    # Seconds a dropout takes per element: on a CPU drawing the random mask dominates it (5 ns an element on the
    # reference machine, barely faster on more cores); 0 on a GPU, whose fused dropout kernels are bandwidth-bound
    # like any elementwise pass (not measured here).
    dropout_seconds_per_element: float = 0.0
    # True when the rates are what this platform's workers measured of their device (workers.engine.probe), not
    # a reference machine's or a vendor's figures.
    measured: bool = False

    def supports(self, precision: str) -> bool:
        return self.peak_flops.get(precision) is not None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["device_names"] = list(self.device_names)
        return out


@dataclass(frozen=True)
class CpuRates:
    """A CPU's rates as ``workers.engine.probe.measure_cpu_rates`` measured them on ``threads`` torch threads: a
    1024² fp32 matmul's FLOP/s, one tiny-demo MoE block's forward and backward at 8 tokens (dispatch), a 64 MiB
    copy's bytes/s and a dropout's seconds per element. ``cpu_profile(rates=...)`` takes them in place of the
    reference machine's figures."""

    matmul_flops: float
    layer_seconds: float
    copy_bytes_per_s: float
    dropout_seconds_per_element: float
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def best(self, other: CpuRates) -> CpuRates:
        """Each rate at the faster of the two measurements (of the same CPU on the same threads): other
        processes' load only ever slows a probe down, so the fastest seen is the closest to what the CPU does."""
        return CpuRates(
            matmul_flops=max(self.matmul_flops, other.matmul_flops),
            layer_seconds=min(self.layer_seconds, other.layer_seconds),
            copy_bytes_per_s=max(self.copy_bytes_per_s, other.copy_bytes_per_s),
            dropout_seconds_per_element=min(self.dropout_seconds_per_element, other.dropout_seconds_per_element),
            threads=self.threads,
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CpuRates:
        """The rates of ``as_dict``'s output; ``ValueError`` naming the field that is missing or not positive."""
        values: dict[str, Any] = {}
        for name in ("matmul_flops", "layer_seconds", "copy_bytes_per_s", "dropout_seconds_per_element"):
            value = raw.get(name)
            # (NaN and infinity fail the bounds: a rate is a finite positive number.)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
            values[name] = float(value)
        threads = raw.get("threads")
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads: expected a positive integer, got {threads!r}")
        return cls(threads=threads, **values)


def _physical_memory_bytes() -> int:
    """RAM of this machine (the CPU profile's memory); 16 GB when the platform does not tell."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GB


# /proc/cpuinfo flags of the CPU units that multiply bf16 natively, each with the name a person knows it by.
# oneDNN (torch's bf16 matmul on CPU) uses AMX tiles where the kernel offers them, else AVX-512 BF16 dot
# products; without either it converts to fp32 and back, slower than plain fp32 (so bf16 is not offered there).
BF16_CPU_UNITS: tuple[tuple[str, str], ...] = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"))
# bf16 matmul rate over fp32's, measured interleaved on the reference machine (``python -m bench.precision``:
# 1024² products on 2 threads, median over rounds, 3.8x with AMX). AVX-512 BF16 alone doubles the multiply-adds
# per instruction: 2x, not measured here (no such CPU).
BF16_SPEEDUP_AMX = 3.8
BF16_SPEEDUP_AVX512 = 2.0


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of this machine's CPU (the first ``flags`` line of ``/proc/cpuinfo``, or of the text
    ``cpuinfo`` when given, for tests); empty when there is none (not Linux, or not x86)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_units(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The units of this CPU (or of ``flags``) that multiply bf16 natively, e.g. ``("AMX", "AVX-512 BF16")``;
    empty when it has none and bf16 would be emulated. AMX counts only with its tile registers (``amx_tile``)."""
    present = cpu_flags() if flags is None else flags
    return tuple(
        name for flag, name in BF16_CPU_UNITS if flag in present and (flag != "amx_bf16" or "amx_tile" in present)
    )


def cpu_profile(
    flags: frozenset[str] | None = None,
    cores: int | None = None,
    rates: CpuRates | None = None,
    units: tuple[str, ...] | None = None,
    memory_bytes: int | None = None,
) -> HardwareProfile:
    """The profile of this machine's CPU, or of one with the ``/proc/cpuinfo`` ``flags`` given (tests inject them):
    ``peak_flops["bf16"]`` is None, bf16 not offered, unless the CPU multiplies bf16 natively. ``cores``: the
    cores a training process uses (default: those this process may run on; ``bench.estimates --threads 1``
    compares a one-thread run with a one-core profile). ``rates``: what a worker measured of its CPU
    (``workers.engine.probe``), which replace the reference machine's matmul peak, per-layer dispatch time and
    bandwidth; the profile then has ``rates.threads`` cores unless ``cores`` says otherwise.

    Another machine's CPU (the workers', described to the web tier): ``units``, its native bf16 units (names of
    ``BF16_CPU_UNITS``, in place of reading ``flags``), and ``memory_bytes``, its RAM."""
    if cores is None:
        if rates is not None:
            cores = rates.threads
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if units is None:
        units = cpu_bf16_units(flags)
    # Per-core figures measured on the reference machine (module docstring), unless the worker measured its own.
    # fp16 autocast on CPU is not offered: the spec reserves fp16 for CUDA.
    # A 1024² fp32 matmul: 183 GFLOP/s in thread time on one thread, 389 on 2 threads of a quiet machine.
    fp32_peak = rates.matmul_flops if rates is not None else 190e9 * cores
    bf16_peak: float | None = None
    if units:
        bf16_peak = fp32_peak * (BF16_SPEEDUP_AMX if "AMX" in units else BF16_SPEEDUP_AVX512)
    measured = "Measured on this platform's reference machine"
    if rates is not None:
        measured = (
            f"Measured by its workers ({rates.threads} thread{'s' if rates.threads != 1 else ''}): "
            f"{rates.matmul_flops / 1e9:.0f} GFLOP/s fp32 matmul, {rates.layer_seconds * 1e3:.1f} ms a small MoE "
            f"block's forward and backward, {rates.copy_bytes_per_s / GB:.1f} GB/s copy, "
            f"{rates.dropout_seconds_per_element * 1e9:.1f} ns a dropout element"
        )
    bf16_note = f"bf16 through {' and '.join(units)}" if units else "no native bf16 (neither AVX-512 BF16 nor AMX)"
    return HardwareProfile(
        key="cpu",
        name=f"This CPU ({cores} core{'s' if cores != 1 else ''})",
        kind="cpu",
        memory_bytes=memory_bytes if memory_bytes is not None else _physical_memory_bytes(),
        bandwidth_bytes_per_s=rates.copy_bytes_per_s if rates is not None else 9 * GB * min(cores, 8),
        peak_flops={"fp32": fp32_peak, "bf16": bf16_peak, "fp16": None},
        # The matmul FLOPs' share of a step's time, beside its dispatch and memory traffic: fitted with
        # full_speed_width to the thread-time steps of the CPU templates and tiny-demo variants (one thread,
        # ``python -m bench.estimates --threads 1 --cpu-time``): the 256-wide small-moe template reached 63% of
        # the peak, the 128-wide tiny demo 42% (= 0.63 * sqrt(128 / 256)).
        efficiency=0.63,
        full_speed_width=256,
        # Dispatch: one tiny-demo MoE block's forward and backward (234 aten calls) took 0.82 + 0.87 ms of thread
        # time on one thread with 8 tokens (6 layers against 2, the difference per layer): ~7.2 µs a call.
        layer_overhead_seconds=rates.layer_seconds if rates is not None else 0.0017,
        # The engine's dropout (workers.engine.kernels.Dropout: uniform_, a comparison and two products) of 2^20
        # fp32 elements: 4.2-5.0 ns an element on 2 threads, 5.1 on one (2026-12-04; torch's bernoulli_-based
        # dropout took 6.7-7.3 and 7.2-9.1).
        dropout_seconds_per_element=rates.dropout_seconds_per_element if rates is not None else 5e-9,
        measured=rates is not None,
        # The process itself: Python with torch imported (~230 MiB resident) and the ~95 MiB that its kernels
        # allocate on first use (thread pools, oneDNN), measured as a run's peak RSS with a negligible model.
        reserved_bytes=int(0.34 * GB),
        # glibc's heap: a run's peak RSS exceeded W + G + O + saved activations by 13-19% of the activations
        # (fp32, 1-8 layers, batch 1-32, measured on the reference machine).
        activation_overhead=1.15,
        # One training process per core at most (torch.distributed over gloo): the processes share the cores.
        max_devices=cores,
        notes=f"{measured}; {bf16_note}; fp16 needs CUDA. Calibrate with a short run on the worker.",
    )


CPU = cpu_profile()

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
