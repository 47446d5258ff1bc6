"""Evaluation reports: ``reports.evaluate`` (``builder.reports.runner.run_report``)."""

from __future__ import annotations

from typing import Any

from builder.core.durable import this_worker
from builder.reports.work import EVALUATE_TASK
from workers.celery import app


@app.task(name=EVALUATE_TASK, bind=True, acks_late=True)
def evaluate(self: Any, report_id: int) -> dict[str, Any]:
    """Claim report ``report_id``, evaluate, export and time its checkpoint, and store every format.

    Idempotent: a duplicate delivery finds the report no longer claimable and returns at once; a rerun of a
    report whose worker died (queued again by the reaper) replaces its files.
    """
    from builder.reports.runner import run_report

    return run_report(report_id, this_worker(self.request.hostname))
