from django.apps import AppConfig


class JobsConfig(AppConfig):
    """Training jobs: dispatch, leases, cancel/resume, the metric record and its live stream."""

    name = "builder.jobs"
    label = "jobs"
