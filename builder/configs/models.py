"""Saved configurations and their versions, and hardware calibrations.

A ``Config`` is a named, described configuration owned by one user; every save is a new ``ConfigVersion``
holding a complete, validated spec (defaults filled in, so two versions diff field by field). Versions are
never edited or deleted one by one: the history is the record.

A ``HardwareCalibration`` is one timed run of a spec on a worker: the worker says which hardware profile its
device is and how long a step took; ``factor`` = measured / predicted step time, as predicted that day. The
estimator applies to everyone's estimates the median, over a profile's recent calibrations, of each one's
measured step over its spec's prediction of today (see ``calibration_factor``: the prediction moves with the
rates the workers measure): a device's speed is a property of the hardware and software, not of who asked, and
a median of several runs resists one run slowed by a busy machine. Each row keeps its requester because the
spec it ran may be private.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models

from builder.core.durable import DurableWork, WorkState


class Config(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="configs")
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, max_length=5000)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="config_name_unique_per_owner")]

    def __str__(self) -> str:
        return self.name

    @property
    def latest(self) -> ConfigVersion:
        """The newest version (a config always has at least one: it is created with it)."""
        version = self.versions.order_by("-number").first()
        assert version is not None, "a config is always saved with its first version"
        return version


class VersionSource(models.TextChoices):
    WIZARD = "wizard", "Wizard"
    EDITOR = "editor", "JSON editor"
    TEMPLATE = "template", "Template"
    COMPARE = "compare", "Comparison"
    API = "api", "API"


class ConfigVersion(models.Model):
    config = models.ForeignKey(Config, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    spec: models.JSONField[Any] = models.JSONField(help_text="A complete spec, validated, defaults filled in.")
    note = models.CharField(max_length=300, blank=True)
    source = models.CharField(max_length=10, choices=VersionSource.choices, default=VersionSource.API)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["config", "number"]
        constraints = [models.UniqueConstraint(fields=["config", "number"], name="one_version_number_per_config")]

    def __str__(self) -> str:
        return f"{self.config.name} v{self.number}"


class HardwareCalibration(DurableWork):
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="hardware_calibrations"
    )
    spec: models.JSONField[Any] = models.JSONField(help_text="The spec that was timed.")
    steps = models.PositiveIntegerField(default=5)
    state = models.CharField(max_length=10, choices=WorkState.choices, default=WorkState.QUEUED)
    hardware = models.CharField(max_length=40, blank=True, db_index=True, help_text="Profile key of the device.")
    device_name = models.CharField(max_length=200, blank=True)
    measured_step_seconds = models.FloatField(null=True, blank=True)
    predicted_step_seconds = models.FloatField(null=True, blank=True, help_text="Uncalibrated prediction.")
    factor = models.FloatField(null=True, blank=True, help_text="measured / predicted step time")
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True, help_text="When a worker claimed it.")
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"calibration {self.pk} ({self.state})"
