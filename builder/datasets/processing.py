"""The work behind the thin dataset tasks: validate and describe a dataset, clean one into a new version.

Both claim the row (durable work, ``builder.datasets.work``: a duplicate delivery finds it taken and does nothing),
read files through storage (``local_copy``: the file itself, or a streamed copy from S3), and record the outcome
on the row, every write fenced by the claim. Both are idempotent, as Celery's late acknowledgement requires: a
task that runs again (its worker died, and the reaper queued the row again) recomputes the same result and
overwrites its own outputs, nothing else. Progress is written to the row at most twice a second; the pages poll
it. (Celery's Django fix-up closes stale database connections around every task, so these functions do not.)
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from builder.core.durable import Claim, Heartbeat, this_worker
from builder.core.redaction import describe_failure
from builder.datasets import storage
from builder.datasets.analysis import Source, analyze
from builder.datasets.cleaning import CleaningError, CleaningOptions, clean
from builder.datasets.models import Dataset, DatasetState
from builder.datasets.work import DATASETS
from workers.engine.data import DataFormatError

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 5.0  # progress writes renew the claim too; this covers long reads between them


def _write(claim: Claim, **fields: Any) -> bool:
    """Update the row while the claim holds it (it renews the heartbeat too); False when it is gone (deleted while
    the worker was busy) or the claim was lost."""
    # update() skips auto_now: set it, so that a dataset whose worker stopped reporting can be told apart.
    return DATASETS.heartbeat(claim, **fields, updated_at=timezone.now())


def _finish(claim: Claim, state: str, **fields: Any) -> bool:
    return DATASETS.finish(claim, state, **fields)


def _progress_writer(claim: Claim) -> Any:
    def write(fraction: float) -> None:
        _write(claim, progress=round(fraction, 4))

    return write


@contextlib.contextmanager
def local_sources(dataset: Dataset) -> Iterator[list[Source]]:
    """Local files of every part of ``dataset``, as reader sources (train before validation)."""
    parts = list(dataset.parts.items())
    with contextlib.ExitStack() as stack:
        sources = [
            Source(
                stack.enter_context(storage.local_copy(name)),
                dataset.format,  # type: ignore[arg-type]
                dataset.text_field,
                dataset.label_field,
                part if part != "data" else None,
                settings.DATASET_MAX_EXAMPLE_BYTES,
            )
            for part, name in parts
        ]
        yield sources


def _format_error(exc: DataFormatError, sources: list[Source]) -> str:
    """The reader's message, naming the part when the dataset has several (never a temporary path)."""
    part = next((s.split for s in sources if str(s.path) == exc.path), None)
    return f"{part} part: {exc.message}" if part and len(sources) > 1 else exc.message


def analyze_dataset(dataset_id: int, worker: str = "") -> dict[str, Any]:
    """Validate ``dataset_id`` and compute its statistics: ready, or invalid with the line and the reason."""
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        return {"dataset": dataset_id, "outcome": "gone"}
    state = DatasetState.VALIDATING if not dataset.stats else DatasetState.ANALYZING
    claim = DATASETS.claim(dataset_id, worker or this_worker(), state=state, **_starting(state))
    if claim is None:
        return {"dataset": dataset_id, "outcome": "not claimable"}
    with Heartbeat(DATASETS, claim, HEARTBEAT_SECONDS):
        return _analyze(dataset, claim)


def _starting(state: DatasetState) -> dict[str, Any]:
    return {"progress": 0.0, "phase": state.label.lower(), "error_line": None, "error_message": ""}


def _analyze(dataset: Dataset, claim: Claim) -> dict[str, Any]:
    """Validate and describe ``dataset`` under ``claim``; records the outcome (fenced) and returns it."""
    dataset_id = dataset.pk
    sources: list[Source] = []
    try:
        with local_sources(dataset) as sources:
            stats = analyze(sources, progress=_progress_writer(claim))
    except DataFormatError as exc:
        _finish(
            claim,
            DatasetState.INVALID,
            progress=1.0,
            error_line=exc.line,
            error_message=_format_error(exc, sources),
        )
        return {"dataset": dataset_id, "outcome": "invalid", "line": exc.line, "message": exc.message}
    except Exception as exc:  # storage down, a bug: recorded on the row, so the page says what happened
        log.exception("analysis of dataset %s failed", dataset_id)
        _finish(claim, DatasetState.FAILED, error_message=describe_failure(exc))
        return {"dataset": dataset_id, "outcome": "failed", "error": str(exc)}
    _finish(
        claim,
        DatasetState.READY,
        progress=1.0,
        stats=stats,
        sha256=stats["files"][0]["sha256"] if stats["files"] else "",
    )
    return {"dataset": dataset_id, "outcome": "ready", "examples": stats["examples"]}


def _owner_usage_without(dataset: Dataset) -> int:
    others = Dataset.objects.filter(owner_id=dataset.owner_id).exclude(pk=dataset.pk)
    return int(others.aggregate(total=Sum("size_bytes"))["total"] or 0)


def clean_dataset(dataset_id: int, worker: str = "") -> dict[str, Any]:
    """Clean the source of the new version ``dataset_id`` into storage, then validate and describe the result."""
    dataset = Dataset.objects.filter(pk=dataset_id).select_related("parent").first()
    if dataset is None:
        return {"dataset": dataset_id, "outcome": "gone"}
    # A previous attempt may have stored outputs: they are replaced, never left behind.
    leftovers = dataset.storage_names
    claim = DATASETS.claim(
        dataset_id,
        worker or this_worker(),
        state=DatasetState.CLEANING,
        **_starting(DatasetState.CLEANING),
        file_name="",
        validation_file_name="",
    )
    if claim is None:  # a repeated delivery after the work was done (or while another worker does it)
        return {"dataset": dataset_id, "outcome": "not claimable"}
    storage.delete_quietly(leftovers)
    with Heartbeat(DATASETS, claim, HEARTBEAT_SECONDS):
        return _clean(dataset, claim)


def _clean(dataset: Dataset, claim: Claim) -> dict[str, Any]:
    dataset_id = dataset.pk
    source = dataset.parent
    if source is None:
        _finish(claim, DatasetState.FAILED, error_message="its source was deleted before cleaning")
        return {"dataset": dataset_id, "outcome": "failed"}
    options = CleaningOptions.model_validate(dataset.cleaning_options)
    folder = f"datasets/user-{dataset.owner_id}/v{dataset.pk}"
    try:
        with local_sources(source) as sources, tempfile.TemporaryDirectory(prefix="clean-") as tmp:
            result = clean(sources, Path(tmp), options, progress=_progress_writer(claim))
            size = result.train_path.stat().st_size
            if result.validation_path is not None:
                size += result.validation_path.stat().st_size
            if _owner_usage_without(dataset) + size > settings.DATASET_QUOTA_BYTES:
                raise CleaningError(f"the cleaned data ({size} bytes) does not fit in your storage quota")
            train = storage.save_local_file(f"{folder}/train.jsonl", result.train_path, "application/jsonl", move=True)
            validation = ""
            if result.validation_path is not None:
                validation = storage.save_local_file(
                    f"{folder}/validation.jsonl", result.validation_path, "application/jsonl", move=True
                )
    except (DataFormatError, CleaningError) as exc:
        message = exc.message if isinstance(exc, DataFormatError) else str(exc)
        line = exc.line if isinstance(exc, DataFormatError) else None
        _finish(claim, DatasetState.FAILED, size_bytes=0, error_line=line, error_message=message)
        return {"dataset": dataset_id, "outcome": "failed", "error": message}
    except Exception as exc:
        log.exception("cleaning of dataset %s failed", dataset_id)
        message = describe_failure(exc)
        _finish(claim, DatasetState.FAILED, size_bytes=0, error_message=message)
        return {"dataset": dataset_id, "outcome": "failed", "error": str(exc)}
    # The same claim goes on to validate and describe the cleaned data.
    stored = _write(
        claim,
        file_name=train,
        validation_file_name=validation,
        size_bytes=size,
        cleaning_report=result.report,
        **_starting(DatasetState.VALIDATING),
        state=DatasetState.VALIDATING,
    )
    if not stored:  # deleted while it was being cleaned (or taken over): its files would belong to no one
        storage.delete_quietly([train, validation])
        return {"dataset": dataset_id, "outcome": "gone"}
    dataset.refresh_from_db()
    outcome = _analyze(dataset, claim)
    return {**outcome, "report": {k: result.report[k] for k in ("input_examples", "kept", "removed")}}
