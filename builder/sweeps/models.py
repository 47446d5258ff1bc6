"""Hyperparameter sweeps: an Optuna study over a saved configuration, each of whose trials is an ordinary job.

A ``Sweep`` is a saved configuration version, a search space over spec field paths, an objective, a trial budget and
a parallelism. Its study lives in the platform's own database through Optuna's RDB storage (``builder.sweeps.study``);
these rows are the platform's record of it: which trial is which job, with its parameters, state, objective and the
reason it ended.

A sweep is durable work (``builder.core.durable``, described by ``builder.sweeps.work``): a worker claims it to run
one *tick* (read its trials' jobs, report their validation points to the pruner, ask the study for new trials and
submit them), then leaves it ``waiting`` until the next tick is due (a trial's job ended, beat's poll, a stop)::

    queued ──claim──▶ ticking ──▶ waiting ──(job ended, poll, stop)──▶ queued ...
                         └──▶ finished | stopped | failed
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models

from builder.core.durable import DurableWork


class SweepState(models.TextChoices):
    QUEUED = "queued", "Tick due"
    TICKING = "ticking", "Ticking"
    WAITING = "waiting", "Running"
    FINISHED = "finished", "Finished"
    STOPPED = "stopped", "Stopped"
    FAILED = "failed", "Failed"


FINAL_SWEEP_STATES = frozenset({SweepState.FINISHED, SweepState.STOPPED, SweepState.FAILED})


class Objective(models.TextChoices):
    VAL_LOSS = "val_loss", "Validation loss (lower is better)"
    VAL_ACCURACY = "val_accuracy", "Validation accuracy (higher is better; classifiers)"


class Pruner(models.TextChoices):
    MEDIAN = "median", "Median: stop a trial whose validation is worse than the median of finished trials"
    HALVING = "halving", "Successive halving: keep the best fraction of trials at each rung"


class Sweep(DurableWork):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="sweeps")
    name = models.CharField(max_length=200)
    config_version = models.ForeignKey(
        "configs.ConfigVersion",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="sweeps",
        help_text="The saved configuration version searched around (base_spec holds what it was).",
    )
    base_spec: models.JSONField[Any] = models.JSONField(help_text="The spec every trial starts from (a snapshot).")
    dataset = models.ForeignKey(
        "datasets.Dataset", on_delete=models.SET_NULL, null=True, blank=True, related_name="sweeps"
    )
    queue = models.CharField(max_length=10, default="gpu")
    space: models.JSONField[Any] = models.JSONField(
        help_text="The search space: [{path, kind: float|int|choice, low, high, log, step, choices}]."
    )
    first_trials: models.JSONField[Any] = models.JSONField(
        default=list, blank=True, help_text="Parameter sets tried first ({path: value}), before the sampler's."
    )
    objective = models.CharField(max_length=20, choices=Objective.choices, default=Objective.VAL_LOSS)
    pruner = models.CharField(max_length=10, choices=Pruner.choices, default=Pruner.MEDIAN)
    budget = models.PositiveIntegerField(help_text="Trials to run in all (failed and pruned ones count).")
    parallelism = models.PositiveIntegerField(help_text="Trials training at the same time, at most.")
    seed = models.PositiveIntegerField(default=0)
    study_name = models.CharField(max_length=100, unique=True)

    state = models.CharField(max_length=10, choices=SweepState.choices, default=SweepState.QUEUED, db_index=True)
    stop_requested = models.BooleanField(default=False)
    # Set by whatever asks for a tick while one runs (a trial's job ended): the running tick then queues the next.
    tick_again = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    importances: models.JSONField[Any] = models.JSONField(
        default=dict, blank=True, help_text="Parameter importances by Optuna's evaluator (path → share)."
    )
    saved_version = models.ForeignKey(
        "configs.ConfigVersion",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The configuration version the best trial was last saved as.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"sweep {self.pk} ({self.state})"

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_SWEEP_STATES

    @property
    def maximize(self) -> bool:
        return self.objective == Objective.VAL_ACCURACY


class TrialState(models.TextChoices):
    PENDING = "pending", "Pending"  # asked of the study, its job not yet submitted (the owner's job limit)
    RUNNING = "running", "Running"  # its job is queued, running or preempted
    COMPLETE = "complete", "Complete"
    PRUNED = "pruned", "Pruned"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_TRIAL_STATES = frozenset({TrialState.PENDING, TrialState.RUNNING})


class Trial(models.Model):
    """One trial of a sweep's study (``number`` is Optuna's trial number), and the job that runs it."""

    sweep = models.ForeignKey(Sweep, on_delete=models.CASCADE, related_name="trials")
    number = models.PositiveIntegerField()
    job = models.OneToOneField("jobs.Job", on_delete=models.SET_NULL, null=True, blank=True, related_name="sweep_trial")
    params: models.JSONField[Any] = models.JSONField(help_text="Spec path → the value this trial tries.")
    state = models.CharField(max_length=10, choices=TrialState.choices, default=TrialState.PENDING, db_index=True)
    objective = models.FloatField(
        null=True, blank=True, help_text="Complete: its best validation value; pruned: its value where it was stopped."
    )
    reason = models.TextField(blank=True, help_text="Why it ended this way (pruned, refused, failed, cancelled).")
    # The last validation step reported to the study: each tick reports only the points after it.
    reported_step = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["sweep", "number"]
        constraints = [models.UniqueConstraint(fields=["sweep", "number"], name="one_trial_per_number")]

    def __str__(self) -> str:
        return f"trial {self.number} of sweep {self.sweep_id} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_TRIAL_STATES
