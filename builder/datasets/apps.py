from django.apps import AppConfig


class DatasetsConfig(AppConfig):
    """Datasets: chunked uploads, validation, cleaning into new versions, statistics, built-in demo corpora."""

    name = "builder.datasets"
    label = "datasets"

    def ready(self) -> None:
        from builder.datasets import work  # noqa: F401  (registers dataset processing as durable work)
