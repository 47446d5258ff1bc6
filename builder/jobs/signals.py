"""What the jobs app tells the apps above it, without importing them (apps import each other only downward)."""

from django.dispatch import Signal

# Sent by the runner once a job's success is committed, with ``job_id``. Receivers must not raise: a finished
# training run is never turned into a failure by what follows it (Django's ``send`` would propagate an error).
job_succeeded = Signal()

# Sent once a job's move to a final state (succeeded, failed, cancelled) is committed, with ``job_id`` and ``state``
# (the sweeps app ticks the trial's sweep). Sent with ``send_robust``: a receiver's error is logged, never raised.
job_ended = Signal()
