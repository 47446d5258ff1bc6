"""Training jobs and their record: metric points and events.

The database is the record; the broker only delivers. A job's state changes only through
``builder.jobs.lifecycle`` (conditional updates, so two workers can never both own a job), and every write a worker
makes is fenced by the lease token it claimed the job with.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

from builder.core.durable import DurableWork


class JobState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    PREEMPTED = "preempted", "Preempted"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.PREEMPTED})


class Job(DurableWork):
    """A training run. Its lease (``attempts``, ``lease_owner``, ``lease_token``, ``heartbeat_at``) is durable work's
    (``builder.core.durable``); its states and their changes are ``builder.jobs.lifecycle``'s."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    shared_with = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="shared_jobs")
    name = models.CharField(max_length=200)
    spec = models.JSONField(help_text="The spec snapshot this job runs (never changes after creation).")
    dataset = models.ForeignKey(
        "datasets.Dataset",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="jobs",
        help_text="The dataset trained on (null once deleted; data_source still names its file).",
    )
    config_version = models.ForeignKey(
        "configs.ConfigVersion",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="jobs",
        help_text="The saved configuration version launched, if any (spec holds what runs).",
    )
    init_checkpoint = models.ForeignKey(
        "checkpoints.ImportedCheckpoint",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="jobs",
        help_text="The imported Hugging Face folder whose weights (and tokenizer) the run starts from, if any.",
    )
    data_source = models.CharField(
        max_length=500, help_text="Storage name of the file the job trains on (copied from the dataset at submit)."
    )
    # The hardware class it trains on (``builder.core.hardware_classes``; its Celery queue).
    queue = models.CharField(max_length=40, default="gpu")

    state = models.CharField(max_length=12, choices=JobState.choices, default=JobState.QUEUED, db_index=True)
    max_attempts = models.PositiveIntegerField(default=3)
    cancel_requested = models.BooleanField(default=False)

    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    last_checkpoint_step = models.PositiveIntegerField(null=True, blank=True)
    metric_seq = models.PositiveBigIntegerField(default=0, help_text="Last sequence number given to a point.")
    event_seq = models.PositiveBigIntegerField(default=0)

    created_at = models.DateTimeField(auto_now_add=True)
    # When the job last entered the queue (submit, resume, re-queue after a crash): Celery delivers in that order,
    # so the queue position counts the jobs queued before this time.
    queued_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True, help_text="First claim by a worker.")
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    result: models.JSONField[Any] = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["state", "heartbeat_at"]),
            # Fair share reads the queued and running jobs of one class (lifecycle.JobWork.choose).
            models.Index(fields=["queue", "state"]),
        ]

    def __str__(self) -> str:
        return f"job {self.pk} ({self.state})"

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


class MetricPoint(models.Model):
    """One value of one metric at one step. ``(job, step, name)`` is unique: a resumed job overwrites."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="points")
    seq = models.PositiveBigIntegerField()
    step = models.PositiveIntegerField()
    name = models.CharField(max_length=120)
    value = models.FloatField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "step", "name"], name="one_point_per_step_and_name")]
        indexes = [models.Index(fields=["job", "seq"])]


class JobEvent(models.Model):
    """Something that happened: state changes, checkpoints, interventions, anomalies, rollbacks."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveBigIntegerField()
    step = models.PositiveIntegerField(default=0)
    kind = models.CharField(max_length=40)
    data: models.JSONField[Any] = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["seq"]
        constraints = [models.UniqueConstraint(fields=["job", "seq"], name="one_event_per_seq")]
