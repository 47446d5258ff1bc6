from django.apps import AppConfig


class ReportsConfig(AppConfig):
    """Evaluation reports of finished jobs: metrics, samples, routing, latency; exports and the playground."""

    name = "builder.reports"
    label = "reports"
