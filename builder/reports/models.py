"""Evaluation reports: one per (job, checkpoint step), computed by a worker, then read by every format.

A report is durable work (``builder.core.durable``, described by ``builder.reports.work``): a worker claims a queued
report (a conditional update that yields a fencing token), and every later write is conditional on that token
still being the report's, so a worker that lost its claim can record nothing. What the worker records is final:
the document (the JSON format without its timestamp), the figures (SVG) and the storage names of the artifacts;
every format is rendered from them.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models

from builder.core.durable import DurableWork, WorkState


class ReportTrigger(models.TextChoices):
    AUTOMATIC = "automatic", "After the job succeeded"
    REQUESTED = "requested", "Requested"


class Report(DurableWork):
    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="reports")
    checkpoint_step = models.PositiveIntegerField(help_text="The step of the checkpoint evaluated.")
    trigger = models.CharField(max_length=12, choices=ReportTrigger.choices, default=ReportTrigger.REQUESTED)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    state = models.CharField(max_length=12, choices=WorkState.choices, default=WorkState.QUEUED, db_index=True)
    error = models.TextField(blank=True)
    document: models.JSONField[Any] = models.JSONField(
        default=dict, blank=True, help_text="The report as JSON (schema_version 1) without generated_at."
    )
    figures: models.JSONField[Any] = models.JSONField(
        default=dict, blank=True, help_text="Figure name → static SVG (the same in the page and the PDF)."
    )
    artifacts: models.JSONField[Any] = models.JSONField(
        default=dict, blank=True, help_text="Artifact name → {storage, bytes, sha256, content_type}."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True, help_text="The latest claim by a worker.")
    finished_at = models.DateTimeField(null=True, blank=True)
    generated_at = models.DateTimeField(null=True, blank=True, help_text="When the stored files were rendered.")

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [models.UniqueConstraint(fields=["job", "checkpoint_step"], name="one_report_per_checkpoint")]

    def __str__(self) -> str:
        return f"report {self.pk} of job {self.job_id} at step {self.checkpoint_step} ({self.state})"

    @property
    def is_finished(self) -> bool:
        return self.state in (WorkState.SUCCEEDED, WorkState.FAILED)
