"""Evaluation reports as durable work (``builder.core.durable``): claimed by a worker, renewed by a heartbeat while
it evaluates, taken over by another worker when it goes silent, failed with the reason after its attempts."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import QuerySet

from builder.core.durable import WorkKind, WorkState, register
from builder.reports.models import Report

EVALUATE_TASK = "reports.evaluate"  # workers.tasks.reports


class ReportWork(WorkKind[Report]):
    label = "report"
    model = Report
    task = EVALUATE_TASK
    # A report whose worker died is sent again until it has been claimed this many times, then failed.
    max_attempts = 3

    def lease_seconds(self) -> int:
        return int(settings.REPORT_TIMEOUT_SECONDS)

    def queue_of(self, row: Report) -> str:
        # The queue the job trained on: the worker there has the job's folder (checkpoints, prepared data), and
        # the latency measured is that of the device that trained.
        return row.job.queue

    def claim_fields(self, now: Any) -> dict[str, Any]:
        return {"started_at": now, "error": ""}

    def queued_rows(self) -> QuerySet[Report]:
        return Report.objects.filter(state=WorkState.QUEUED).select_related("job").order_by("created_at", "id")

    def stale_reason(self, row: Report) -> str:
        return (
            f"its worker {row.lease_owner} stopped answering (no heartbeat within {self.lease_seconds()} s); "
            "request it again"
        )


REPORTS = register(ReportWork())
