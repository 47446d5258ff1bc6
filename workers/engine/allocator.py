"""Keep freed CPU memory inside the process while a training run allocates the same buffers every step.

Why: every CPU training step frees and re-allocates the same large tensors (gradients, activations, logits).
glibc's malloc serves blocks above its mmap threshold (at most 32 MiB, and an expert-weight gradient of a
64-expert layer is 64 MiB) with a fresh ``mmap`` and returns them with ``munmap`` on free, and it trims the
top of its heap back to the kernel as soon as 128 KiB are free there. So each step page-faults hundreds of
megabytes in again and the kernel zeroes them first. Measured on the ``make bench`` model at 64 experts (2
threads): ~9,000 minor faults and 0.36 s of kernel time per step before, 1 fault and ~5 ms after; the median
step of ``python -m workers.engine.calibrate`` 934 → 713 ms (8 experts: 521 → 512 ms).

``keep_freed_memory()`` pins glibc's thresholds for the duration of a block (``mallopt``: no mmap for
allocations, no trimming), so a freed block stays in the heap and the next step reuses its pages. On exit it
restores glibc's documented defaults and calls ``malloc_trim(0)``, which returns the free pages, so a
long-lived worker process does not keep a finished run's peak. The peak barely moves: a run's peak is its
largest live set, and freed blocks are reused before the heap grows (measured: 2,339 → 2,381 MiB at 64
experts, 972 → 962 MiB at 8). Off Linux/glibc it does nothing.

Pure Python + ctypes; process-wide (malloc is), so blocks nest and count: the settings apply while any
block is open.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator

# mallopt parameter numbers (glibc <malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's documented defaults (mallopt(3)); mallopt has no getter, so these are what exit restores.
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
# The largest value mallopt takes (a C int): free memory at the top of the heap up to 2 GiB stays mapped.
_NO_TRIM = 2**31 - 1

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    """glibc's C library, or None where malloc is not glibc's (macOS, musl) or it is turned off."""
    if os.environ.get("ENGINE_KEEP_FREED_MEMORY", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def _set(libc: ctypes.CDLL, trim_threshold: int, mmap_max: int) -> bool:
    # mallopt returns 1 on success; both must take or neither is worth keeping.
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and libc.mallopt(_M_MMAP_MAX, mmap_max) == 1)


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Within the block, memory that the process frees stays mapped for its next allocation (glibc only).

    Yields True when the settings are in force (Linux with glibc; ``ENGINE_KEEP_FREED_MEMORY=0`` turns this
    off), False when the block changes nothing. Thread-safe and re-entrant: the outermost block applies
    and restores.
    """
    global _depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _lock:
        applied = _depth > 0 or _set(libc, _NO_TRIM, 0)
        if applied:
            _depth += 1
    try:
        yield applied
    finally:
        if applied:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    _set(libc, _DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX)
                    libc.malloc_trim(0)
