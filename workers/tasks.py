"""Thin Celery tasks: take ids, call one function, return a JSON-able outcome."""

from __future__ import annotations

import os
import socket
from typing import Any

from workers.celery import app


@app.task(name="workers.tasks.ping")
def ping(payload: str = "") -> dict[str, Any]:
    """A round trip through the broker and a worker: echoes ``payload`` with where it ran."""
    import torch

    return {
        "payload": payload,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "cuda": torch.cuda.is_available(),
    }
