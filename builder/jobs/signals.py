"""What the jobs app tells the apps above it, without importing them (apps import each other only downward)."""

from django.dispatch import Signal

# Sent by the runner once a job's success is committed, with ``job_id``. Receivers must not raise: a finished
# training run is never turned into a failure by what follows it (Django's ``send`` would propagate an error).
job_succeeded = Signal()
