from django.apps import AppConfig


class JobsConfig(AppConfig):
    """Training jobs: dispatch, leases, cancel/resume, the metric record and its live stream."""

    name = "builder.jobs"
    label = "jobs"

    def ready(self) -> None:
        from builder.datasets.services import deletion_guards
        from builder.jobs import lifecycle  # registers jobs as durable work

        if lifecycle.jobs_training_on not in deletion_guards:
            deletion_guards.append(lifecycle.jobs_training_on)
