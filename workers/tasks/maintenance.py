"""What keeps durable work moving: the reaper (beat), redelivery when a worker starts, and a ping."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery.signals import worker_ready
from django.conf import settings

from builder.core.durable import reap_all, redeliver_all
from workers.celery import app

log = logging.getLogger(__name__)

PING_TASK = "core.ping"
REAP_TASK = "core.reap"


@app.task(name=PING_TASK)
def ping(payload: str = "") -> dict[str, Any]:
    """A round trip through the broker and a worker: echoes ``payload`` with where it ran."""
    import torch

    return {
        "payload": payload,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "cuda": torch.cuda.is_available(),
    }


@app.task(name=REAP_TASK)
def reap() -> dict[str, list[int]]:
    """Queue again (or fail, once out of attempts) the jobs, reports, calibrations and dataset processing whose
    worker went silent, and send again what has waited in the queue past ``REDELIVER_AFTER_SECONDS`` since it was
    last sent (run by Celery beat)."""
    return reap_all(redeliver_after=settings.REDELIVER_AFTER_SECONDS)


@worker_ready.connect
def redeliver_queued(sender: Any = None, **_: Any) -> None:
    """Send the task again for every queued row of every kind of work on one of this worker's queues.

    The database is the record and the broker only delivers: work queued while the broker was down (a preemption
    at shutdown, with Redis stopping first) has no message. A duplicate is harmless: the claim is a conditional
    update, so the second delivery finds the row taken and returns at once.
    """
    try:
        queues = [q.name for q in sender.task_consumer.queues] if sender is not None else []
        sent = {kind: ids for kind, ids in redeliver_all(queues).items() if ids}
        if sent:
            log.info("redelivered queued work %s", sent)
    except Exception:  # the worker must start even if the database is not there yet
        log.exception("could not redeliver queued work")
