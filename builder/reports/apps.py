from django.apps import AppConfig


class ReportsConfig(AppConfig):
    """Evaluation reports of finished jobs: metrics, samples, routing, latency; exports and the playground."""

    name = "builder.reports"
    label = "reports"

    def ready(self) -> None:
        # Its kind of durable work (the reaper and redelivery find it), and the evaluation of every job that
        # succeeds (the jobs app signals it: it never imports this app).
        from builder.jobs.signals import job_succeeded
        from builder.reports import work  # noqa: F401
        from builder.reports.services import after_job_succeeded

        job_succeeded.connect(after_job_succeeded, dispatch_uid="reports-after-job-succeeded")
