"""The Celery app. Workers consume the queues ``gpu`` (training; CPU fallback when no GPU) and ``cpu``.

Configuration comes from Django settings (``CELERY_*``): JSON only, late acks, prefetch 1, routes to
``gpu``/``cpu``. Start a worker with ``celery -A workers.celery worker -Q gpu,cpu``.
"""

import contextlib
import logging
import os
import signal
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down
from kombu import Exchange, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "builder.settings")

app = Celery("moe_builder")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Each queue gets its own exchange and routing key: with bare Queue(name) both would bind to the default
# queue's exchange and a task routed to one would be delivered to both.
app.conf.task_queues = tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in ("gpu", "cpu"))
app.autodiscover_tasks(["workers"], related_name="tasks", force=True)

log = logging.getLogger(__name__)


@worker_shutting_down.connect
def preempt_training(**_: Any) -> None:
    """On a warm shutdown (SIGTERM or Ctrl-C to the worker), ask every pool process that is training to stop.

    Celery waits for running tasks but never signals them, and its pool processes are killed anyway by whoever
    stops the worker a few seconds later (honcho, systemd, Kubernetes). SIGTERM reaches the engine's handler in
    the pool process: it finishes its step, writes a checkpoint and returns "preempted"; the runner records the
    preemption and queues the job again, so the next worker continues from that checkpoint instead of waiting
    for the lease to expire and repeating every step since the last periodic checkpoint.
    """
    from celery.worker import state

    for request in list(state.active_requests):
        pid = getattr(request, "worker_pid", None)
        # A solo/threads pool runs tasks in this very process: signalling it would turn this into a cold shutdown.
        if request.name == "workers.tasks.train_job" and pid and pid != os.getpid():
            log.info("preempting training task %s in pool process %s", request.id, pid)
            with contextlib.suppress(ProcessLookupError):  # it just finished
                os.kill(pid, signal.SIGTERM)


@worker_ready.connect
def redeliver_queued_jobs(sender: Any = None, **_: Any) -> None:
    """Send the task again for every job (and evaluation report) queued on one of this worker's queues.

    The database is the record and the broker only delivers: a job re-queued while the broker was down (a
    preemption at shutdown, with Redis stopping first) has no message. A duplicate is harmless: the claim is a
    conditional update, so the second delivery finds the job taken and returns at once.
    """
    try:
        queues = [q.name for q in sender.task_consumer.queues] if sender is not None else []
        from builder.jobs.lifecycle import redeliver_queued
        from builder.reports.services import redeliver_queued as redeliver_reports

        jobs, reports = redeliver_queued(queues), redeliver_reports(queues)
        if jobs or reports:
            log.info("redelivered queued jobs %s and reports %s", jobs, reports)
    except Exception:  # the worker must start even if the database is not there yet
        log.exception("could not redeliver queued jobs")
