"""A worker's presence in the registry of workers (``builder.fleet.registry``): advertised when it is ready (its
hardware, found by a child process, and its queues), renewed by a heartbeat, marked stopped at a warm shutdown."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_ready, worker_shutdown

log = logging.getLogger(__name__)
_presence: Any = None


@worker_ready.connect
def advertise_worker(sender: Any = None, **_: Any) -> None:
    """Start this worker's ``Presence`` (in threads of the main process: the first beat waits for nothing)."""
    global _presence
    from builder.fleet.registry import Presence

    try:
        queues = [q.name for q in sender.task_consumer.queues] if sender is not None else []
        _presence = Presence(sender.hostname if sender is not None else "worker", os.getpid(), queues)
        _presence.start()
    except Exception:  # a worker trains whether or not the page can show it
        log.exception("could not start the worker's presence in the registry")


@worker_shutdown.connect
def retire_worker(**_: Any) -> None:
    if _presence is not None:
        _presence.stop()
