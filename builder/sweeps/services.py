"""What the sweeps API, pages and socket share: starting a sweep (every refusal names its field), stopping it, saving
its best trial as a configuration version, who may see it, and the snapshot every view shows.

A sweep is its owner's alone: anyone else is answered as if it did not exist (404, never 403).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.http import Http404
from django.urls import reverse

from builder.configs.models import ConfigVersion, VersionSource
from builder.configs.services import parse_spec, save_version
from builder.core.errors import Refusal
from builder.jobs.models import Job
from builder.jobs.submit import resolve_spec, visible_config_versions, visible_ready_datasets
from builder.sweeps.models import ACTIVE_TRIAL_STATES, Objective, Pruner, Sweep, Trial, TrialState
from builder.sweeps.space import UNFIT, apply, parse_first_trials, parse_space
from builder.sweeps.work import SWEEPS, publish, request_tick

MAX_PARALLELISM = 16


def visible_sweeps(user: Any) -> QuerySet[Sweep]:
    if not user.is_authenticated:
        return Sweep.objects.none()
    return Sweep.objects.filter(owner=user)


def get_visible_sweep(user: Any, sweep_id: int) -> Sweep:
    sweep = visible_sweeps(user).filter(pk=sweep_id).first()
    if sweep is None:
        raise Http404("no such sweep")
    return sweep


@dataclass(frozen=True)
class SweepRequest:
    """What a person asks for (the API's body, the wizard's button); ``start_sweep`` checks every field."""

    name: str
    config_version: int
    dataset: int
    space: Any
    objective: str = Objective.VAL_LOSS
    budget: int = 6
    parallelism: int = 2
    pruner: str = Pruner.MEDIAN
    queue: str = ""
    seed: int = 0
    first_trials: Any = field(default=None)


def start_sweep(owner: Any, request: SweepRequest) -> Sweep:
    """Create the sweep and queue its first tick (which creates the study and submits the first trials).

    Refusals name their field: 422 for what the API's schema cannot state (an id naming nothing of yours, a path
    the spec does not have, a bound the spec refuses), 400 for a space whose shape is not the published one."""
    version = visible_config_versions(owner).filter(pk=request.config_version).first()
    if version is None:
        raise Refusal("config_version", "no saved configuration version of yours has this id", UNFIT)
    dataset = visible_ready_datasets(owner).filter(pk=request.dataset).first()
    if dataset is None:
        raise Refusal("dataset", "no ready dataset you may train on has this id", UNFIT)
    if request.queue and request.queue not in settings.QUEUE_HARDWARE:
        raise Refusal("queue", f"choose one of {', '.join(settings.QUEUE_HARDWARE)} (or leave it out)", UNFIT)
    if request.objective not in Objective.values:
        raise Refusal("objective", f"choose one of {', '.join(Objective.values)}", UNFIT)
    if request.pruner not in Pruner.values:
        raise Refusal("pruner", f"choose one of {', '.join(Pruner.values)}", UNFIT)
    if not 1 <= request.budget <= settings.SWEEP_MAX_TRIALS:
        raise Refusal("budget", f"a sweep runs 1 to {settings.SWEEP_MAX_TRIALS} trials", UNFIT)
    if not 1 <= request.parallelism <= min(request.budget, MAX_PARALLELISM):
        raise Refusal(
            "parallelism", f"between 1 and the budget ({min(request.budget, MAX_PARALLELISM)} at most)", UNFIT
        )
    # The spec every trial starts from: the version's, with the data fields the dataset decides (as a job's).
    base = resolve_spec(version.spec, dataset)
    if request.objective == Objective.VAL_ACCURACY and base["model"]["task"] != "classification":
        raise Refusal("objective", "val_accuracy is measured for classifiers only; use val_loss", UNFIT)
    params = parse_space(request.space, base)
    first = parse_first_trials(request.first_trials, params)
    with transaction.atomic():
        sweep = Sweep.objects.create(
            owner=owner,
            name=request.name,
            config_version=version,
            base_spec=base,
            dataset=dataset,
            # The class every trial runs on, fixed now: the default class, when none is named, may change later.
            queue=request.queue or getattr(settings, "JOBS_DEFAULT_QUEUE", "gpu"),
            space=[p.as_dict() for p in params],
            first_trials=first,
            objective=request.objective,
            pruner=request.pruner,
            budget=request.budget,
            parallelism=request.parallelism,
            seed=request.seed,
            study_name=f"sweep-{uuid.uuid4().hex}",
        )
        SWEEPS.dispatch(sweep)
    return sweep


def stop_sweep(sweep: Sweep) -> None:
    """Stop asking for trials and cancel the active ones' jobs (at the next tick, queued now). A sweep that already
    ended is a ``Refusal`` (409, with its ``state``)."""
    if sweep.is_final:
        raise Refusal("", f"the sweep already {sweep.state}", 409, state=sweep.state)
    Sweep.objects.filter(pk=sweep.pk).update(stop_requested=True)
    request_tick(sweep.pk)
    transaction.on_commit(lambda: publish(sweep.pk))


def best_trial(sweep: Sweep) -> Trial | None:
    complete = sweep.trials.filter(state=TrialState.COMPLETE, objective__isnull=False)
    return complete.order_by("-objective" if sweep.maximize else "objective", "number").first()


def save_best(sweep: Sweep, note: str = "") -> ConfigVersion:
    """Save the best completed trial's spec as a new version of the configuration the sweep searched around."""
    best = best_trial(sweep)
    if best is None:
        raise Refusal("", "no trial has completed yet", 409, state=sweep.state)
    version = sweep.config_version
    if version is None:
        raise Refusal("", "the configuration this sweep searched around was deleted", 409, state=sweep.state)
    spec = parse_spec(apply(sweep.base_spec, best.params))
    values = ", ".join(f"{path}={value}" for path, value in best.params.items())
    score = f"{sweep.objective} {best.objective:.4g}"
    text = note or f"best trial {best.number} of sweep {sweep.name!r}: {score} ({values})"
    saved = save_version(version.config, spec, source=VersionSource.API, note=text[:300])
    Sweep.objects.filter(pk=sweep.pk).update(saved_version=saved)
    return saved


def trial_row(trial: Trial, job: Job | None) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state,
        "params": trial.params,
        "objective": trial.objective,
        "reason": trial.reason,
        "job": trial.job_id,
        "job_state": job.state if job is not None else None,
        "step": job.step if job is not None else None,
        "total_steps": job.total_steps if job is not None else None,
        "dashboard": reverse("jobs:detail", args=[trial.job_id]) if trial.job_id else None,
    }


def snapshot(sweep: Sweep) -> dict[str, Any]:
    """Everything the sweep's page, socket and API show, read fresh from the database."""
    sweep.refresh_from_db()
    trials = list(sweep.trials.select_related("job").order_by("number"))
    best = best_trial(sweep)
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state] = counts.get(trial.state, 0) + 1
    version = sweep.config_version
    saved = sweep.saved_version
    return {
        "id": sweep.pk,
        "name": sweep.name,
        "state": sweep.state,
        "running": not sweep.is_final,
        "stop_requested": sweep.stop_requested,
        "error": sweep.error,
        "objective": sweep.objective,
        "direction": "maximize" if sweep.maximize else "minimize",
        "budget": sweep.budget,
        "parallelism": sweep.parallelism,
        "pruner": sweep.pruner,
        "queue": sweep.queue,
        "seed": sweep.seed,
        "config_version": version.pk if version is not None else None,
        "config": version.config_id if version is not None else None,
        "config_name": f"{version.config.name} v{version.number}" if version is not None else None,
        "dataset": sweep.dataset_id,
        "space": sweep.space,
        "first_trials": sweep.first_trials,
        "trials": [trial_row(t, t.job) for t in trials],
        "counts": counts,
        "active": sum(1 for t in trials if t.state in ACTIVE_TRIAL_STATES),
        "best": None if best is None else {"number": best.number, "objective": best.objective, "params": best.params},
        "importances": sweep.importances,
        "saved_version": None if saved is None else {"id": saved.pk, "number": saved.number, "note": saved.note},
        "created_at": sweep.created_at.isoformat(),
        "finished_at": sweep.finished_at.isoformat() if sweep.finished_at else None,
    }


# The wizard's small sweep around its proposal: the learning rate from a third of it to three times it (log scale),
# the proposal itself tried first, six trials, two at a time.
TUNE_LR_PATH = "training.optimizer.lr"
TUNE_LR_FACTOR = 3.0
TUNE_LR_BUDGET = 6


@dataclass(frozen=True)
class TunePlan:
    """What "let the platform tune the learning rate" will start (shown to the person before it starts)."""

    version: ConfigVersion
    dataset: Any
    low: float
    high: float
    proposed: float
    budget: int
    parallelism: int

    def request(self) -> SweepRequest:
        return SweepRequest(
            name=f"tune the learning rate of {self.version.config.name} v{self.version.number}"[:200],
            config_version=self.version.pk,
            dataset=self.dataset.pk,
            space=[{"path": TUNE_LR_PATH, "kind": "float", "low": self.low, "high": self.high, "log": True}],
            budget=self.budget,
            parallelism=self.parallelism,
            first_trials=[{TUNE_LR_PATH: self.proposed}],
        )


def tune_lr_plan(owner: Any, version: ConfigVersion) -> TunePlan:
    """The small learning-rate sweep around ``version`` on the built-in corpus; a ``Refusal`` says why there is none."""
    from builder.jobs.submit import default_dataset
    from builder.sweeps.space import field_problems

    dataset = default_dataset(owner)
    if dataset is None:
        raise Refusal("dataset", "the built-in corpus is not ready yet; start a sweep through the API on a dataset")
    proposed = float(version.spec["training"]["optimizer"]["lr"])
    low, high = proposed / TUNE_LR_FACTOR, proposed * TUNE_LR_FACTOR
    if field_problems(version.spec, TUNE_LR_PATH, high):  # above the optimizer's bound: search up to the proposal
        high = proposed
    parallelism = min(2, settings.JOBS_MAX_ACTIVE_PER_USER)
    return TunePlan(version, dataset, low, high, proposed, TUNE_LR_BUDGET, parallelism)
