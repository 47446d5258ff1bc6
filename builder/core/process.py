"""Process helpers shared by the commands and workers that run under the supervisor."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies, even by SIGKILL (Linux's prctl).

    A no-op elsewhere. Used in a child right after fork (or before exec) so that it never outlives the process
    that supervises it: a Celery pool process whose worker was killed gets SIGTERM and checkpoints its job.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig)
