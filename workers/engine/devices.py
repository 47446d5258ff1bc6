"""What devices this machine trains on: type, count, memory per device and bf16 support, as JSON.

A Celery worker advertises it (``builder.fleet``), but asks a child process (``python -m workers.engine.devices``)
rather than calling CUDA itself: a process that initialises CUDA and then forks (Celery's prefork pool) leaves its
children unable to use the GPU. Every CUDA call is guarded: a driver that fails answers as "no CUDA" with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.engine.hardware import cpu_bf16_units, profile_for_device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "CPU"


def _cpu_bf16() -> bool:
    """Whether bf16 matmuls run natively here (oneDNN's check: AVX-512 BF16 or AMX); False when it cannot tell."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # an older or a stripped build without the op: say no rather than guess
        return False


def describe_devices(probe: bool = True) -> dict[str, Any]:
    """``{"device_type": "cuda" | "cpu", "count", "name", "memory_bytes" (per device), "bf16", "profile"
    (the matching key of workers.engine.hardware, or null), "cuda_error" (why CUDA is not used, or null)}``.

    On CPU ``count`` is the cores this process may use (one training process each) and ``memory_bytes`` the
    machine's RAM, shared by them; ``bf16_units`` names the units that multiply bf16 natively (``["AMX",
    "AVX-512 BF16"]``, empty without: ``workers.engine.hardware.cpu_bf16_units``), and ``bf16`` is true only
    when oneDNN also says it runs bf16 there; ``rates`` is what ``workers.engine.probe`` measured of the CPU (the
    estimator's rates for it), or None with ``rates_error`` (``probe`` False: not measured, ``rates_error``
    says so).
    """
    import torch

    cuda_error: str | None = None
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            props = torch.cuda.get_device_properties(0)
            profile = profile_for_device("cuda", props.name)
            return {
                "device_type": "cuda",
                "count": torch.cuda.device_count(),
                "name": props.name,
                "memory_bytes": int(props.total_memory),
                "bf16": bool(torch.cuda.is_bf16_supported()),
                "profile": profile.key if profile else None,
                "cuda_error": None,
                "torch": torch.__version__,
            }
        cuda_error = "torch sees no CUDA device" if torch.version.cuda else "this torch build has no CUDA"
    except Exception as exc:  # a broken driver: train on the CPU, and say why
        cuda_error = f"CUDA failed: {exc}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    units = cpu_bf16_units()
    try:
        memory = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        memory = 0
    return {
        "device_type": "cpu",
        "count": cores,
        "name": _cpu_name(),
        "memory_bytes": memory,
        "bf16": _cpu_bf16() and bool(units),
        "bf16_units": list(units),
        "profile": "cpu",
        "cuda_error": cuda_error,
        "torch": torch.__version__,
        **(_measured_rates() if probe else {"rates": None, "rates_error": "not measured (WORKER_CPU_PROBE is off)"}),
    }


# Workers started together on one machine (``make run`` starts two) would probe at the same moment and each
# measure half the CPU (99 and 128 GFLOP/s against 250-280 alone): one probe at a time per machine.
PROBE_LOCK = Path(tempfile.gettempdir()) / "moe-builder-cpu-probe.lock"
PROBE_LOCK_WAIT_SECONDS = 60.0


@contextlib.contextmanager
def _one_probe_at_a_time(path: Path = PROBE_LOCK, wait_s: float = PROBE_LOCK_WAIT_SECONDS) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` while the block runs; yields whether it got it (after ``wait_s``
    without it, or where ``flock`` does not exist, the probe runs anyway: a rate measured under load is better
    than none, and a later refresh keeps the faster one)."""
    try:
        import fcntl
    except ImportError:  # not a Unix
        yield False
        return
    with open(path, "a") as fh:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _measured_rates() -> dict[str, Any]:
    """``{"rates": CpuRates.as_dict(), "rates_error": None}`` of this CPU (``workers.engine.probe``, one probe at a
    time on this machine), or ``rates`` None and why: a failed probe leaves the estimates on the reference figures,
    it does not stop the worker."""
    try:
        from workers.engine.probe import measure_cpu_rates

        with _one_probe_at_a_time():
            return {"rates": measure_cpu_rates().as_dict(), "rates_error": None}
    except Exception as exc:
        return {"rates": None, "rates_error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    import sys

    print(json.dumps(describe_devices(probe="--no-probe" not in sys.argv[1:])))
