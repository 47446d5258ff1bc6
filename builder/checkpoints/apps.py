from django.apps import AppConfig


class CheckpointsConfig(AppConfig):
    """Imported checkpoints: Hugging Face folders a job can start from (continued pre-training or fine-tuning)."""

    name = "builder.checkpoints"
    label = "checkpoints"

    def ready(self) -> None:
        from django.conf import settings

        from builder.core import body_limits

        # An upload is one multipart request: the folder's files (or its zip) and their boundaries.
        body_limits.allow("POST", r"^/api/checkpoints/?$", lambda: settings.CHECKPOINT_MAX_UPLOAD_BYTES + 64 * 1024)
        body_limits.allow("POST", r"^/checkpoints/?$", lambda: settings.CHECKPOINT_MAX_UPLOAD_BYTES + 64 * 1024)
