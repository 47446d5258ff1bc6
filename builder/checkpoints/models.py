"""An imported checkpoint: a Hugging Face folder (``config.json`` + ``model.safetensors`` [+ tokenizer]) a user
uploaded, checked (``builder.checkpoints.services.import_checkpoint``) and stored, with the spec derived from its
config. Visible and usable by its owner only; a job that starts from it keeps it (``Job.init_checkpoint``, PROTECT).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models


class ImportedCheckpoint(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="imported_checkpoints")
    name = models.CharField(max_length=200)
    family = models.CharField(max_length=40, help_text="transformers model_type: deepseek_v3, glm4_moe, qwen2_moe.")
    architecture = models.CharField(max_length=80, help_text="The transformers class of the folder.")
    config = models.JSONField(help_text="The folder's config.json.")
    spec = models.JSONField(help_text="The spec derived from config.json (validated); a job's model must match it.")
    files: models.JSONField[dict[str, Any]] = models.JSONField(
        default=dict, help_text="File name in the folder -> its storage name."
    )
    size_bytes = models.PositiveBigIntegerField(default=0)
    weights_sha256 = models.CharField(max_length=64)
    notes = models.JSONField(default=list, help_text="What the import left out, for the owner to read.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.family})"
