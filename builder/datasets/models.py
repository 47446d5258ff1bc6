"""Datasets and the chunked uploads that create them.

A dataset is one or two files in the platform's storage (local disk or S3: ``default_storage``), never edited
after it is written: cleaning makes a new dataset (a new version, ``parent`` pointing at its source). Built-in
datasets have no owner and are visible to every signed-in user; every other dataset is visible to its owner only.

``state`` moves ``queued`` → ``validating``/``cleaning`` → ``ready``, ``invalid`` (the file is malformed:
``error_line`` and ``error_message`` say where and why) or ``failed`` (something else went wrong, e.g. storage).
Recomputing statistics moves ``ready`` → ``analyzing`` → ``ready``. Only the worker functions in
``builder.datasets.processing`` change it, under a claim (durable work: ``builder.datasets.work``).
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import models

from builder.core.durable import DurableWork


class DatasetState(models.TextChoices):
    QUEUED = "queued", "Queued"
    VALIDATING = "validating", "Validating"
    CLEANING = "cleaning", "Cleaning"
    ANALYZING = "analyzing", "Computing statistics"
    READY = "ready", "Ready"
    INVALID = "invalid", "Invalid"
    FAILED = "failed", "Failed"


BUSY_STATES = frozenset({DatasetState.QUEUED, DatasetState.VALIDATING, DatasetState.CLEANING, DatasetState.ANALYZING})
TERMINAL_STATES = frozenset({DatasetState.READY, DatasetState.INVALID, DatasetState.FAILED})


class Origin(models.TextChoices):
    UPLOAD = "upload", "Uploaded"
    CLEANED = "cleaned", "Cleaned version"
    BUILTIN = "builtin", "Built-in"


class DataFormat(models.TextChoices):
    JSONL = "jsonl", "JSON Lines"
    TXT = "txt", "Plain text"
    CSV = "csv", "CSV"


class Dataset(DurableWork):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="datasets",
        null=True,
        blank=True,
        help_text="None for built-in datasets (visible to everyone, owned by no one).",
    )
    slug = models.SlugField(max_length=100, unique=True, null=True, blank=True, help_text="Built-in datasets only.")
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    origin = models.CharField(max_length=10, choices=Origin.choices, default=Origin.UPLOAD)
    parent = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="derived", help_text="Cleaned from."
    )
    version = models.PositiveIntegerField(default=1)

    format = models.CharField(max_length=10, choices=DataFormat.choices)
    text_field = models.CharField(max_length=200, default="text")
    label_field = models.CharField(max_length=200, blank=True, help_text="Empty: the dataset carries no labels.")
    original_filename = models.CharField(max_length=255, blank=True)
    file_name = models.CharField(max_length=500, blank=True, help_text="Storage name of the data (cleaned: train).")
    validation_file_name = models.CharField(
        max_length=500, blank=True, help_text="Cleaned versions with a split: storage name of the validation part."
    )
    size_bytes = models.PositiveBigIntegerField(default=0, help_text="All of the dataset's files together.")
    sha256 = models.CharField(max_length=64, blank=True)

    state = models.CharField(max_length=12, choices=DatasetState.choices, default=DatasetState.QUEUED, db_index=True)
    progress = models.FloatField(default=0.0)
    phase = models.CharField(max_length=200, blank=True, help_text="What the worker is doing, for people.")
    error_line = models.PositiveIntegerField(null=True, blank=True)
    error_message = models.TextField(blank=True)

    stats: models.JSONField[Any] = models.JSONField(default=dict, blank=True)
    cleaning_options: models.JSONField[Any] = models.JSONField(default=dict, blank=True)
    cleaning_report: models.JSONField[Any] = models.JSONField(default=dict, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"dataset {self.pk} {self.name!r} ({self.state})"

    @property
    def is_builtin(self) -> bool:
        return self.origin == Origin.BUILTIN

    @property
    def is_busy(self) -> bool:
        return self.state in BUSY_STATES

    @property
    def storage_names(self) -> list[str]:
        """Every storage object of this dataset (what deleting it removes)."""
        return [name for name in (self.file_name, self.validation_file_name) if name]

    @property
    def parts(self) -> dict[str, str]:
        """Downloadable parts: ``{"data": name}`` or, for a split version, ``{"train": ..., "validation": ...}``."""
        if self.validation_file_name:
            return {"train": self.file_name, "validation": self.validation_file_name}
        return {"data": self.file_name} if self.file_name else {}


class UploadSession(models.Model):
    """A chunked upload in progress: chunks are appended, in order, to a staging file on the web host.

    ``received`` is the next byte offset expected, so a client that lost a response asks for the session and
    resumes from there. Completing the session moves the staged file into storage and creates the dataset.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="dataset_uploads")
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    filename = models.CharField(max_length=255)
    format = models.CharField(max_length=10, choices=DataFormat.choices)
    text_field = models.CharField(max_length=200, default="text")
    label_field = models.CharField(max_length=200, blank=True)
    size = models.PositiveBigIntegerField(help_text="Declared size in bytes; the upload must deliver exactly this.")
    received = models.PositiveBigIntegerField(default=0)
    dataset = models.OneToOneField(
        Dataset, on_delete=models.CASCADE, null=True, blank=True, related_name="upload_session"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"upload {self.id} ({self.received}/{self.size} bytes)"

    @property
    def is_open(self) -> bool:
        return self.dataset_id is None
