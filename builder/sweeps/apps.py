from django.apps import AppConfig


class SweepsConfig(AppConfig):
    """Hyperparameter sweeps: an Optuna study whose trials are ordinary jobs (above jobs and reports)."""

    name = "builder.sweeps"
    label = "sweeps"

    def ready(self) -> None:
        # Its kind of durable work (the reaper and redelivery find it), and a tick whenever a trial's job ends (the
        # jobs app signals it: it never imports this app).
        from builder.jobs.signals import job_ended
        from builder.sweeps import work

        job_ended.connect(work.after_job_ended, dispatch_uid="sweeps-after-job-ended")
