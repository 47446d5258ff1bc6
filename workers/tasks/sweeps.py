"""Sweeps: ``sweeps.tick`` (``builder.sweeps.runner.run_tick``) and beat's ``sweeps.poll``."""

from __future__ import annotations

from typing import Any

from builder.core.durable import this_worker
from builder.sweeps.work import POLL_TASK, TICK_TASK
from workers.celery import app


@app.task(name=TICK_TASK, bind=True, acks_late=True)
def tick(self: Any, sweep_id: int) -> dict[str, Any]:
    """Claim sweep ``sweep_id`` and run one tick: follow its trials' jobs, prune, ask for and submit new trials.

    Idempotent: a duplicate delivery finds the sweep no longer claimable and returns at once.
    """
    from builder.sweeps.runner import run_tick

    return run_tick(sweep_id, this_worker(self.request.hostname))


@app.task(name=POLL_TASK)
def poll() -> list[int]:
    """A tick for every waiting sweep (run by beat), so the pruner sees new validation points while trials train."""
    from builder.sweeps.work import poll as poll_sweeps

    return poll_sweeps()
