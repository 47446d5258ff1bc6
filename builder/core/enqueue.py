"""Send a Celery task by name: the one way the web side starts work on a worker.

Code that sends a task never imports the task's module (``workers.tasks.*`` imports the apps' orchestration code;
importing it back would close a circle). The Celery app module (``workers.celery``) holds no task, so importing it
here is safe; the contract ``web-sends-tasks-by-name`` in pyproject.toml keeps it so.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

log = logging.getLogger(__name__)
# A few quick retries (about half a second in all), not Celery's default of several seconds: a request that
# records work must answer promptly even when the broker is down.
SEND_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def send(name: str, *args: Any, queue: str) -> bool:
    """Send task ``name`` with ``args`` to ``queue`` now; False when the broker could not take it.

    Best effort by design: the row the task works on is already committed in its queued state, and queued rows
    are sent again (``builder.core.durable.redeliver_all``), so a broker that is down must not turn a recorded
    request into an error. The result is never read here (the database is the record): not subscribing to it
    keeps a send from waiting on the result backend.
    """
    from workers.celery import app

    try:
        app.send_task(name, args=args, queue=queue, ignore_result=True, retry_policy=SEND_RETRY)
    except Exception:
        log.warning(
            "could not send %s%r to %s; it is sent again with the queued work", name, args, queue, exc_info=True
        )
        return False
    return True


def enqueue_on_commit(name: str, *args: Any, queue: str) -> None:
    """Send task ``name`` once the current transaction commits (at once outside one).

    A task must never see a row that does not exist yet, nor run for a row whose creation was rolled back.
    """
    transaction.on_commit(lambda: send(name, *args, queue=queue))
