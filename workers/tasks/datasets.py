"""Dataset processing: ``datasets.analyze`` and ``datasets.clean`` (``builder.datasets.processing``)."""

from __future__ import annotations

from typing import Any

from builder.core.durable import this_worker
from builder.datasets.work import ANALYZE_TASK, CLEAN_TASK
from workers.celery import app


@app.task(name=ANALYZE_TASK, bind=True, acks_late=True)
def analyze(self: Any, dataset_id: int) -> dict[str, Any]:
    """Validate dataset ``dataset_id`` and compute its statistics (a duplicate delivery does nothing)."""
    from builder.datasets.processing import analyze_dataset

    return analyze_dataset(dataset_id, this_worker(self.request.hostname))


@app.task(name=CLEAN_TASK, bind=True, acks_late=True)
def clean(self: Any, dataset_id: int) -> dict[str, Any]:
    """Clean the source of the new version ``dataset_id``, then describe it (a rerun replaces its outputs)."""
    from builder.datasets.processing import clean_dataset

    return clean_dataset(dataset_id, this_worker(self.request.hostname))
