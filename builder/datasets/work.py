"""Dataset processing as durable work (``builder.core.durable``): validation, statistics and cleaning are claimed by
one ``cpu`` worker, renewed by a heartbeat (and by every progress write), queued again when that worker goes
silent, and failed with the reason after their attempts.

One model, two tasks: a cleaned version that has no data yet is cleaned (then described in the same claim);
every other queued dataset is validated and described.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from builder.core.durable import WorkKind, register
from builder.datasets.models import BUSY_STATES, Dataset, DatasetState, Origin

ANALYZE_TASK = "datasets.analyze"  # workers.tasks.datasets
CLEAN_TASK = "datasets.clean"
DATASET_QUEUE = "cpu"  # light work: never behind a long training run


class DatasetWork(WorkKind[Dataset]):
    label = "dataset"
    model = Dataset
    task = ANALYZE_TASK
    queued_state = DatasetState.QUEUED
    working_states = BUSY_STATES - {DatasetState.QUEUED}
    claim_state = DatasetState.VALIDATING
    failed_state = DatasetState.FAILED
    error_field = "error_message"

    def lease_seconds(self) -> int:
        return int(settings.DATASET_WORK_TIMEOUT_SECONDS)

    def queue_of(self, row: Dataset) -> str:
        return DATASET_QUEUE

    def task_of(self, row: Dataset) -> str:
        return CLEAN_TASK if row.origin == Origin.CLEANED and not row.file_name else ANALYZE_TASK

    def claim_fields(self, now: Any) -> dict[str, Any]:
        # update() skips auto_now: set it, as every write of the processing does.
        return {"updated_at": now}

    def final_fields(self, now: Any) -> dict[str, Any]:
        return {"updated_at": now, "phase": ""}


DATASETS = register(DatasetWork())
