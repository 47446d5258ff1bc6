from django.apps import AppConfig


class DatasetsConfig(AppConfig):
    """Datasets: chunked uploads, validation, cleaning into new versions, statistics, built-in demo corpora."""

    name = "builder.datasets"
    label = "datasets"

    def ready(self) -> None:
        from django.conf import settings

        from builder.core import body_limits
        from builder.datasets import work  # noqa: F401  (registers dataset processing as durable work)

        # The only addresses that take more than REQUEST_MAX_BODY_BYTES: an upload chunk, and a small file in one
        # multipart request (its form fields and boundaries take a few bytes more than the file).
        body_limits.allow(
            "PUT", r"^/api/datasets/uploads/[0-9a-fA-F-]+/?$", lambda: settings.DATASET_UPLOAD_CHUNK_BYTES
        )
        body_limits.allow("POST", r"^/api/datasets/?$", lambda: settings.DATASET_SIMPLE_UPLOAD_MAX_BYTES + 64 * 1024)
