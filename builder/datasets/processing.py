"""The work behind the thin dataset tasks: validate and describe a dataset, clean one into a new version.

Both re-read the row, read files through storage (``local_copy``: the file itself, or a streamed copy from S3),
and record the outcome on the row. Both are idempotent, as Celery's late acknowledgement requires: a task that
runs again (its worker died) recomputes the same result and overwrites its own outputs, nothing else.
Progress is written to the row at most twice a second; the pages poll it. (Celery's Django fix-up closes stale
database connections around every task, so these functions do not.)
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

from builder.datasets import storage
from builder.datasets.analysis import Source, analyze
from builder.datasets.cleaning import CleaningError, CleaningOptions, clean
from builder.datasets.models import Dataset, DatasetState
from workers.engine.data import DataFormatError

log = logging.getLogger(__name__)


def _set(dataset_id: int, **fields: Any) -> bool:
    """Update the row; False when it is gone (deleted while the worker was busy)."""
    # update() skips auto_now: set it, so that a dataset whose worker stopped reporting can be told apart.
    return bool(Dataset.objects.filter(pk=dataset_id).update(**fields, updated_at=timezone.now()))


def _progress_writer(dataset_id: int) -> Any:
    def write(fraction: float) -> None:
        _set(dataset_id, progress=round(fraction, 4))

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
            )
            for part, name in parts
        ]
        yield sources


def _format_error(exc: DataFormatError, sources: list[Source]) -> str:
    """The reader's message, naming the part when the dataset has several (never a temporary path)."""
    part = next((s.split for s in sources if str(s.path) == exc.path), None)
    return f"{part} part: {exc.message}" if part and len(sources) > 1 else exc.message


def analyze_dataset(dataset_id: int) -> dict[str, Any]:
    """Validate ``dataset_id`` and compute its statistics: ready, or invalid with the line and the reason."""
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        return {"dataset": dataset_id, "outcome": "gone"}
    first_read = not dataset.stats
    state = DatasetState.VALIDATING if first_read else DatasetState.ANALYZING
    _set(dataset_id, state=state, progress=0.0, phase=state.label.lower(), error_line=None, error_message="")
    sources: list[Source] = []
    try:
        with local_sources(dataset) as sources:
            stats = analyze(sources, progress=_progress_writer(dataset_id))
    except DataFormatError as exc:
        _set(
            dataset_id,
            state=DatasetState.INVALID,
            progress=1.0,
            phase="",
            error_line=exc.line,
            error_message=_format_error(exc, sources),
        )
        return {"dataset": dataset_id, "outcome": "invalid", "line": exc.line, "message": exc.message}
    except Exception as exc:  # storage down, a bug: recorded on the row, so the page says what happened
        log.exception("analysis of dataset %s failed", dataset_id)
        _set(dataset_id, state=DatasetState.FAILED, phase="", error_message=f"{type(exc).__name__}: {exc}")
        return {"dataset": dataset_id, "outcome": "failed", "error": str(exc)}
    _set(
        dataset_id,
        state=DatasetState.READY,
        progress=1.0,
        phase="",
        stats=stats,
        sha256=stats["files"][0]["sha256"] if stats["files"] else "",
    )
    return {"dataset": dataset_id, "outcome": "ready", "examples": stats["examples"]}


def _owner_usage_without(dataset: Dataset) -> int:
    others = Dataset.objects.filter(owner_id=dataset.owner_id).exclude(pk=dataset.pk)
    return int(others.aggregate(total=Sum("size_bytes"))["total"] or 0)


def clean_dataset(dataset_id: int) -> dict[str, Any]:
    """Clean the source of the new version ``dataset_id`` into storage, then validate and describe the result."""
    dataset = Dataset.objects.filter(pk=dataset_id).select_related("parent").first()
    if dataset is None:
        return {"dataset": dataset_id, "outcome": "gone"}
    if dataset.state == DatasetState.READY:
        return {"dataset": dataset_id, "outcome": "ready"}  # a repeated delivery after the work was done
    source = dataset.parent
    if source is None:
        _set(dataset_id, state=DatasetState.FAILED, phase="", error_message="its source was deleted before cleaning")
        return {"dataset": dataset_id, "outcome": "failed"}
    # A previous attempt may have stored outputs: they are replaced, never left behind.
    storage.delete_quietly(dataset.storage_names)
    _set(dataset_id, state=DatasetState.CLEANING, progress=0.0, phase="cleaning", file_name="", validation_file_name="")
    options = CleaningOptions.model_validate(dataset.cleaning_options)
    folder = f"datasets/user-{dataset.owner_id}/v{dataset.pk}"
    try:
        with local_sources(source) as sources, tempfile.TemporaryDirectory(prefix="clean-") as tmp:
            result = clean(sources, Path(tmp), options, progress=_progress_writer(dataset_id))
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
        _set(dataset_id, state=DatasetState.FAILED, phase="", size_bytes=0, error_line=line, error_message=message)
        return {"dataset": dataset_id, "outcome": "failed", "error": message}
    except Exception as exc:
        log.exception("cleaning of dataset %s failed", dataset_id)
        message = f"{type(exc).__name__}: {exc}"
        _set(dataset_id, state=DatasetState.FAILED, phase="", size_bytes=0, error_message=message)
        return {"dataset": dataset_id, "outcome": "failed", "error": str(exc)}
    stored = _set(
        dataset_id, file_name=train, validation_file_name=validation, size_bytes=size, cleaning_report=result.report
    )
    if not stored:  # deleted while it was being cleaned: its files would belong to no one
        storage.delete_quietly([train, validation])
        return {"dataset": dataset_id, "outcome": "gone"}
    outcome = analyze_dataset(dataset_id)
    return {**outcome, "report": {k: result.report[k] for k in ("input_examples", "kept", "removed")}}
