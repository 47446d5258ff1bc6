"""Submitting a job, for the API and the launch form alike: resolve the spec and the dataset, check the per-user
limit, create the row, dispatch the task once the row is committed.

Every refusal is a ``builder.core.errors.Refusal`` naming the field at fault (``NON_FIELD`` when it is about no
one field), so that the API answers 400 with ``{field: [message]}`` and the form shows the message next to the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import models, transaction
from pydantic import ValidationError

from builder.configs.models import ConfigVersion
from builder.configs.services import visible_configs
from builder.core.errors import NON_FIELD, Refusal
from builder.jobs import lifecycle
from builder.jobs.models import ACTIVE_STATES, Job, JobState
from workers.engine.spec import load_spec, spec_errors

QUEUES = ("gpu", "cpu")


def visible_config_versions(user: Any) -> models.QuerySet[ConfigVersion]:
    """The saved configuration versions ``user`` may launch: the versions of the configurations they can see."""
    return ConfigVersion.objects.filter(config__in=visible_configs(user)).select_related("config")


def visible_ready_datasets(user: Any) -> models.QuerySet[Any]:
    """Datasets ``user`` may train on: their own and the built-in ones, validated (``ready``)."""
    from builder.datasets.models import DatasetState
    from builder.datasets.services import visible_datasets

    return visible_datasets(user).filter(state=DatasetState.READY).exclude(file_name="")


def default_dataset(user: Any) -> Any:
    """The built-in demo corpus for language modelling, when it exists: what the launch form preselects."""
    from builder.datasets.demo import CORPUS_SLUG

    return visible_ready_datasets(user).filter(slug=CORPUS_SLUG).first()


def resolve_spec(spec: Any, dataset: Any) -> dict[str, Any]:
    """The spec the job will run: validated, with the data fields taken from ``dataset``.

    The dataset knows which field holds the text (and the label); the spec's ``data.text_field`` and
    ``data.label_field`` are set from it so that the engine reads the file the way it was validated.
    """
    if not isinstance(spec, dict):
        raise Refusal("spec", "spec must be a JSON object")
    raw = dict(spec)
    data = raw.get("data", {})
    if isinstance(data, dict):  # anything else is left for validation to report at "data"
        data = {**data, "text_field": dataset.text_field or "text"}
        if dataset.label_field:
            data["label_field"] = dataset.label_field
        raw["data"] = data
    try:
        checked = load_spec(raw)
    except ValidationError as exc:
        # Field paths below spec, e.g. "model.moe.top_k", so the client can point at the field.
        raise Refusal.of([("spec", f"{e['path']}: {e['message']}") for e in spec_errors(exc)]) from None
    if checked.model.task == "classification" and not dataset.label_field:
        raise Refusal("dataset", f"dataset {dataset.name!r} has no label field; a classification model needs one")
    return checked.model_dump(mode="json")


@dataclass(frozen=True)
class Submission:
    """What to run: exactly one of ``spec`` (inline) and ``config_version`` (a saved version), on ``dataset``."""

    name: str
    dataset: Any
    queue: str = "gpu"
    spec: dict[str, Any] | None = None
    config_version: ConfigVersion | None = None


def submit_job(owner: Any, submission: Submission) -> Job:
    """Create the job and send its task once the row is committed. Refuses past ``JOBS_MAX_ACTIVE_PER_USER``."""
    if submission.queue not in QUEUES:
        raise Refusal("queue", f"choose one of {', '.join(QUEUES)}")
    if submission.spec is not None and submission.config_version is not None:
        raise Refusal("spec", "give an inline spec or a saved config_version, not both")
    if submission.spec is None and submission.config_version is None:
        raise Refusal("spec", "give an inline spec or a saved config_version")
    version = submission.config_version
    raw_spec = version.spec if version is not None else submission.spec
    spec = resolve_spec(raw_spec, submission.dataset)
    check_fits(spec, submission.queue)
    with transaction.atomic():
        check_active_limit(owner)
        job = Job.objects.create(
            owner=owner,
            name=submission.name,
            spec=spec,
            dataset=submission.dataset,
            data_source=submission.dataset.file_name,
            queue=submission.queue,
            total_steps=spec["training"]["max_steps"],
            config_version=version,
        )
        lifecycle.add_event(job.pk, "state", {"from": None, "to": "queued", "reason": "submitted"})
        lifecycle.dispatch(job)
    return job


def check_fits(spec: dict[str, Any], queue: str) -> None:
    """Refuse a spec whose predicted peak memory does not fit the hardware of ``queue`` (``QUEUE_HARDWARE``): it
    would only fail on the worker, after waiting its turn. The refusal carries the estimate and the fix."""
    from workers.engine.estimate import estimate
    from workers.engine.hardware import get_profile

    hardware = get_profile(settings.QUEUE_HARDWARE[queue])
    risk = estimate(load_spec(spec), hardware).risk
    if risk.level == "will_not_fit":
        raise Refusal("spec", f"it cannot train on the {queue} queue's hardware ({hardware.name}). {risk.message}")


def check_active_limit(owner: Any) -> None:
    """Refuse when ``owner`` already has ``JOBS_MAX_ACTIVE_PER_USER`` queued or running jobs.

    Call inside the transaction that creates or re-queues the job: it locks the owner's row, so that on
    PostgreSQL two simultaneous submissions cannot both count the same active jobs and both pass. (SQLite
    transactions are IMMEDIATE here, already serialised.)
    """
    get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
    active = Job.objects.filter(owner=owner, state__in=ACTIVE_STATES).count()
    limit = settings.JOBS_MAX_ACTIVE_PER_USER
    if active >= limit:
        raise Refusal(
            NON_FIELD, f"you already have {active} active jobs (limit {limit}); wait for one to end or cancel one"
        )


def resume_job(job: Job) -> None:
    """Queue a stopped job again (``lifecycle.resume``), within the owner's limit of active jobs.

    Every refusal is a conflict with the job as it is (409, with its ``state``): past the limit, when its dataset
    was deleted, or for a job that cannot resume.
    """
    try:
        if job.dataset_id is None:
            raise Refusal("dataset", "the dataset this job trained on was deleted; launch a new job on another dataset")
        with transaction.atomic():
            if job.state != JobState.PREEMPTED:  # a preempted job already counts as active
                check_active_limit(job.owner)
            lifecycle.resume(job)
    except Refusal as exc:
        # A resume is an action on the job, not a form: the problem (its field named in the text) is a 409's detail.
        raise Refusal("", str(exc), 409, state=job.state) from None
