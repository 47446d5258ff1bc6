"""What the web does with datasets: who sees what, quotas, starting work, deleting (uploads: ``uploads``).

Every refusal is a ``builder.core.errors.Refusal`` naming the field at fault (or ``""``) and the HTTP status to
answer with; the API and the pages turn it into their own error shapes. Long work (validation, statistics,
cleaning) is never done here: it is dispatched to the ``cpu`` queue once the row is committed
(``builder.datasets.processing``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet, Sum
from django.http import Http404

from builder.core.errors import Refusal
from builder.datasets import storage
from builder.datasets.models import DataFormat, Dataset, DatasetState, Origin, UploadSession
from builder.datasets.work import DATASETS

if TYPE_CHECKING:  # the cleaning module loads the engine's readers (and torch): the web needs only the type here
    from builder.datasets.cleaning import CleaningOptions

# What may refuse a deletion, registered by the apps above this one (which import this app, never the reverse):
# each returns the reason, or "" when it has no objection.
deletion_guards: list[Callable[[Dataset], str]] = []


# --- Who sees what ---------------------------------------------------------------------------------------------


def visible_datasets(user: Any) -> QuerySet[Dataset]:
    """The user's own datasets and the built-in ones. Anyone else's do not exist, as far as this user knows."""
    if not user.is_authenticated:
        return Dataset.objects.none()
    return Dataset.objects.filter(Q(owner=user) | Q(origin=Origin.BUILTIN))


def get_visible_dataset(user: Any, dataset_id: int) -> Dataset:
    """The dataset, or 404 (never 403) so that other users' datasets are not revealed."""
    dataset = visible_datasets(user).filter(pk=dataset_id).first()
    if dataset is None:
        raise Http404("no such dataset")
    return dataset


def require_owner(user: Any, dataset: Dataset, action: str) -> None:
    if dataset.is_builtin:
        raise Refusal("", f"built-in datasets cannot be {action}; clean one to get a copy of your own", 403)
    if dataset.owner_id != user.pk:
        raise Http404("no such dataset")


# --- Quota -----------------------------------------------------------------------------------------------------


def used_bytes(user: Any) -> int:
    """Bytes the user holds: datasets in any state, plus what open uploads have reserved."""
    datasets = Dataset.objects.filter(owner=user).aggregate(total=Sum("size_bytes"))["total"] or 0
    uploads = UploadSession.objects.filter(owner=user, dataset__isnull=True).aggregate(total=Sum("size"))["total"]
    return int(datasets) + int(uploads or 0)


def quota_report(user: Any) -> dict[str, int]:
    used = used_bytes(user)
    quota = int(settings.DATASET_QUOTA_BYTES)
    return {"used_bytes": used, "quota_bytes": quota, "free_bytes": max(0, quota - used)}


def check_quota(user: Any, extra: int, field: str = "size") -> None:
    report = quota_report(user)
    if extra > report["free_bytes"]:
        raise Refusal(
            field,
            f"storage quota exceeded: this needs {extra} bytes, {report['free_bytes']} of your "
            f"{report['quota_bytes']} are free",
            413,
            **report,
        )


def check_fields(fmt: str, text_field: str, label_field: str) -> tuple[str, str]:
    """The text and label fields to read ``fmt`` with (TXT has neither: one document per paragraph).

    Its refusals are 422: each field alone is well-formed; together with the format they are not."""
    if fmt == DataFormat.TXT:
        if label_field:
            raise Refusal("label_field", "TXT files carry no labels: use JSONL or CSV for labelled data", 422)
        return "text", ""
    if not text_field:
        raise Refusal("text_field", "choose the field (JSONL) or column (CSV) that holds the text", 422)
    if label_field == text_field:
        raise Refusal("label_field", "the label must be another field than the text", 422)
    return text_field, label_field


# --- Work ------------------------------------------------------------------------------------------------------


def dispatch_analysis(dataset: Dataset) -> None:
    """Queue validation/statistics once the row is committed (a task must never miss its row)."""
    DATASETS.dispatch(dataset)


def start_analysis(dataset: Dataset) -> Dataset:
    """Recompute the statistics of a dataset (not while it is being processed).

    Returns the dataset as this request left it (state ``queued``): it is read back before the commit sends the
    task, so a fast worker's ``validating`` never shows up in the reply of the request that queued it."""
    if dataset.is_busy:
        raise Refusal("", f"the dataset is {dataset.get_state_display().lower()}; wait for it to finish", 409)
    if dataset.state == DatasetState.FAILED and not dataset.file_name:
        raise Refusal("", "this dataset has no data (its cleaning failed); delete it", 409)
    with transaction.atomic():
        Dataset.objects.filter(pk=dataset.pk).update(
            state=DatasetState.QUEUED,
            progress=0.0,
            phase="waiting for a worker",
            error_line=None,
            error_message="",
            attempts=0,  # a person asked: the worker gets a fresh set of attempts
        )
        # Read back inside the transaction: the task is sent on commit, and a worker may claim it at once.
        dataset.refresh_from_db()
        dispatch_analysis(dataset)
    return dataset


def update_fields(dataset: Dataset, text_field: str, label_field: str) -> Dataset:
    """Read an uploaded dataset with other fields/columns: validation and statistics run again."""
    if dataset.origin != Origin.UPLOAD:
        raise Refusal("text_field", "only uploaded datasets can be read with other fields", 409)
    text_field, label_field = check_fields(dataset.format, text_field, label_field)
    if dataset.is_busy:
        raise Refusal("", f"the dataset is {dataset.get_state_display().lower()}; wait for it to finish", 409)
    Dataset.objects.filter(pk=dataset.pk).update(text_field=text_field, label_field=label_field)
    dataset.refresh_from_db()
    return start_analysis(dataset)


def start_cleaning(user: Any, source: Dataset, options: CleaningOptions, name: str = "") -> Dataset:
    """Create the new version (owned by ``user``, even when cleaning a built-in dataset) and queue its cleaning.

    The source's size is reserved from the quota: cleaning never writes more than a few bytes per example beyond
    its input (JSON quoting), and the final size is checked again when the output exists.
    """
    if source.state != DatasetState.READY:
        raise Refusal("", f"only a ready dataset can be cleaned; this one is {source.get_state_display().lower()}", 409)
    with transaction.atomic():
        check_quota(user, source.size_bytes, field="")
        # The next number after the source's and every version already cleaned from it.
        lineage = Dataset.objects.filter(Q(pk=source.pk) | Q(parent=source))
        version = max(lineage.values_list("version", flat=True)) + 1
        dataset = Dataset.objects.create(
            owner=user,
            name=name or f"{source.name} (cleaned v{version})",
            description=source.description if source.origin != Origin.BUILTIN else "",
            origin=Origin.CLEANED,
            parent=source,
            version=version,
            format=DataFormat.JSONL,
            text_field="text",
            label_field="label" if source.label_field else "",
            original_filename=source.original_filename,
            size_bytes=source.size_bytes,  # reserved until the real size is known
            cleaning_options=options.model_dump(),
            phase="waiting for a worker to clean it",
        )
        DATASETS.dispatch(dataset)
    return dataset


def delete_dataset(dataset: Dataset) -> None:
    """Delete the row, then its files (a file without a row is garbage; a row without its file would be a lie).

    Refused while a job that trains on it is queued, running or preempted (409). Refused too while a worker is
    writing it, unless the worker has been silent past its lease (it died; the reaper would queue it again): a
    worker that finds its row gone stops there. A queued dataset can always be deleted. Apps above this one refuse
    through ``deletion_guards`` (the jobs app: a job trains on it).
    """
    working = dataset.is_busy and dataset.state != DatasetState.QUEUED
    if working and not DATASETS.stale_rows().filter(pk=dataset.pk).exists():
        raise Refusal("", f"the dataset is {dataset.get_state_display().lower()}; wait for it to finish", 409)
    for guard in deletion_guards:
        if reason := guard(dataset):
            raise Refusal("", reason, 409)
    names = dataset.storage_names
    dataset.delete()
    transaction.on_commit(lambda: storage.delete_quietly(names))
