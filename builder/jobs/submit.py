"""Submitting a job, for the API and the launch form alike: resolve the spec and the dataset, check the per-user
limit, create the row, dispatch the task once the row is committed.

Every refusal is a ``builder.core.errors.Refusal`` naming the field at fault (``NON_FIELD`` when it is about no
one field), so that the API answers 400 with ``{field: [message]}`` and the form shows the message next to the field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import models, transaction
from pydantic import ValidationError

from builder.configs.models import ConfigVersion
from builder.configs.services import spec_status, visible_configs
from builder.core import hardware_classes
from builder.core.errors import NON_FIELD, Refusal
from builder.jobs import lifecycle
from builder.jobs.models import ACTIVE_STATES, Job, JobState
from workers.engine.spec import load_spec, spec_errors


def queues() -> tuple[str, ...]:
    """The hardware classes a launch may choose (``QUEUE_HARDWARE``), the default first."""
    default = hardware_classes.default_class()
    return (default, *(name for name in settings.QUEUE_HARDWARE if name != default))


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
        problems = [("spec", f"{e['path']}: {e['message']}") for e in spec_errors(exc)]
        raise Refusal.of(problems, spec_status(exc)) from None
    if checked.model.task == "classification" and not dataset.label_field:
        raise Refusal(
            "dataset", f"dataset {dataset.name!r} has no label field; a classification model needs one", status=422
        )
    return checked.model_dump(mode="json")


@dataclass(frozen=True)
class Submission:
    """What to run: exactly one of ``spec`` (inline) and ``config_version`` (a saved version), on ``dataset``."""

    name: str
    dataset: Any
    queue: str = ""  # a hardware class; "" is JOBS_DEFAULT_QUEUE
    spec: dict[str, Any] | None = None
    config_version: ConfigVersion | None = None
    init_checkpoint: Any = None  # an ImportedCheckpoint of the owner's, to start from


def submit_job(owner: Any, submission: Submission) -> Job:
    """Create the job and send its task once the row is committed. Refuses past ``JOBS_MAX_ACTIVE_PER_USER``."""
    queue = submission.queue or hardware_classes.default_class()
    if queue not in settings.QUEUE_HARDWARE:
        raise Refusal("queue", f"choose a hardware class: one of {', '.join(queues())} (GET /api/hardware/classes)")
    if submission.spec is not None and submission.config_version is not None:
        raise Refusal("spec", "give an inline spec or a saved config_version, not both")
    if submission.spec is None and submission.config_version is None:
        raise Refusal("spec", "give an inline spec or a saved config_version")
    version = submission.config_version
    raw_spec = version.spec if version is not None else submission.spec
    spec = resolve_spec(raw_spec, submission.dataset)
    if submission.init_checkpoint is not None:
        from builder.checkpoints.services import check_job_start

        if submission.init_checkpoint.owner_id != owner.pk:
            raise Refusal("init_checkpoint", "no imported checkpoint of yours with that id")
        check_job_start(submission.init_checkpoint, spec)
    check_fits(spec, queue)
    with transaction.atomic():
        check_active_limit(owner)
        job = Job.objects.create(
            owner=owner,
            name=submission.name,
            spec=spec,
            dataset=submission.dataset,
            data_source=submission.dataset.file_name,
            queue=queue,
            total_steps=spec["training"]["max_steps"],
            config_version=version,
            init_checkpoint=submission.init_checkpoint,
        )
        lifecycle.add_event(job.pk, "state", {"from": None, "to": "queued", "reason": "submitted"})
        lifecycle.dispatch(job)
    return job


def requested_devices(spec: dict[str, Any]) -> tuple[int, str, bool]:
    """``training.distributed``'s devices, strategy and expert parallelism, read defensively: a spec without the
    section (older specs, or before the field exists) asks for one device with DDP."""
    training = spec.get("training") if isinstance(spec.get("training"), dict) else {}
    distributed = training.get("distributed") if isinstance(training, dict) else None
    if not isinstance(distributed, dict):
        return 1, "ddp", False
    devices = distributed.get("devices", 1)
    devices = devices if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1 else 1
    return devices, str(distributed.get("strategy") or "ddp"), bool(distributed.get("expert_parallel"))


def _estimator_parallelism(strategy: str, expert_parallel: bool) -> Any:
    """The estimator's name for how the devices share the model; DDP (a full replica per device, the most memory)
    for a strategy it does not model yet, so that a refusal is never wrong about a job that would fit."""
    from typing import get_args

    from workers.engine.estimate import Parallelism

    wanted = "expert" if expert_parallel else strategy
    return wanted if wanted in get_args(Parallelism) else "ddp"


# A well-formed spec that its class's hardware cannot run breaks a rule, it is not a malformed request.
UNFIT = 422


def check_fits(spec: dict[str, Any], queue: str) -> None:
    """Refuse a spec that its hardware class (``QUEUE_HARDWARE``) cannot run: more devices than one of its workers
    has (``training.distributed.devices``), or a predicted peak memory per device beyond a device's memory. Either
    would only fail on the worker, after waiting its turn. The refusal names the field, the estimate and the fix."""
    from workers.engine.estimate import estimate

    hardware_class = hardware_classes.get_class(queue)
    if hardware_class is None:
        raise Refusal("queue", f"choose a hardware class: one of {', '.join(queues())}")
    hardware = hardware_class.machine  # a CPU's as its live workers describe it (RAM), not the web host's
    devices, strategy, expert_parallel = requested_devices(spec)
    if devices > hardware_class.devices:
        others = [c for c in hardware_classes.classes().values() if c.devices >= devices]
        elsewhere = f", or choose a class with {devices}: {', '.join(c.name for c in others)}" if others else ""
        raise Refusal(
            "spec",
            f"training.distributed.devices: {devices} devices asked for, but a worker of the {queue} class has "
            f"{hardware_class.devices} ({hardware.name}). Fix: training.distributed.devices = "
            f"{hardware_class.devices}{elsewhere}.",
            status=UNFIT,
        )
    if hardware.kind == "cpu":
        _check_fits_cpu(spec, queue, hardware, devices)
        return
    risk = estimate(
        load_spec(spec), hardware, num_gpus=devices, parallelism=_estimator_parallelism(strategy, expert_parallel)
    ).risk
    if risk.level == "will_not_fit":
        raise Refusal(
            "spec", f"it cannot train on the {queue} class's hardware ({hardware.name}). {risk.message}", status=UNFIT
        )


def _check_fits_cpu(spec: dict[str, Any], queue: str, hardware: Any, devices: int) -> None:
    """On a CPU the processes share the machine's memory: each holds a whole replica and its share of the batch
    (DDP; an upper bound for FSDP, which holds less). The estimate is of one such process, times the processes."""
    from workers.engine.estimate import estimate

    per_process = copy.deepcopy(spec)
    training = per_process["training"]
    training["batch_size"] = max(1, int(training["batch_size"]) // devices)
    if isinstance(training.get("distributed"), dict):
        training["distributed"] = {**training["distributed"], "devices": 1, "expert_parallel": False}
    result = estimate(load_spec(per_process), hardware)
    if result.risk.level == "will_not_fit":
        raise Refusal(
            "spec",
            f"it cannot train on the {queue} class's hardware ({hardware.name}). {result.risk.message}",
            status=UNFIT,
        )
    peak = result.memory.peak
    if devices > 1 and devices * peak > hardware.memory_bytes:
        gib = 2**30
        raise Refusal(
            "spec",
            f"training.distributed.devices: {devices} processes of about {peak / gib:.2f} GiB each need "
            f"{devices * peak / gib:.1f} GiB, more than the {hardware.memory_bytes / gib:.1f} GiB of the {queue} "
            f"class's machine. Fix: training.distributed.devices = {max(1, hardware.memory_bytes // peak)}.",
            status=UNFIT,
        )


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
