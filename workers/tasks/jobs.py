"""Training jobs: ``jobs.train`` (``builder.jobs.runner.run_job``), and preemption of a training run when its
worker stops."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any

from celery.signals import worker_process_init, worker_shutting_down

from builder.core.durable import this_worker
from builder.core.process import die_with_parent
from builder.jobs.lifecycle import TRAIN_TASK
from workers.celery import app

log = logging.getLogger(__name__)
# The name this task had before the tasks were split by kind (``workers.tasks.legacy`` still accepts it).
LEGACY_TRAIN_TASK = "workers.tasks.train_job"


@app.task(name=TRAIN_TASK, bind=True, acks_late=True)
def train(self: Any, job_id: int) -> dict[str, Any]:
    """Claim job ``job_id``, train it (resuming from its last checkpoint) and record the outcome.

    Idempotent: a duplicate delivery finds the job no longer claimable and returns at once.
    """
    from builder.jobs.runner import run_job

    return run_job(job_id, this_worker(self.request.hostname))


@worker_process_init.connect
def stop_with_the_worker(**_: Any) -> None:
    """A pool process gets SIGTERM when its worker dies, even by SIGKILL: a training run then checkpoints and is
    recorded preempted and queued again (as at a warm shutdown), so the restarted worker continues it, instead of
    an orphan training on unsupervised."""
    die_with_parent(signal.SIGTERM)


@worker_shutting_down.connect
def preempt_training(**_: Any) -> None:
    """On a warm shutdown (SIGTERM or Ctrl-C to the worker), ask every pool process that is training to stop.

    Celery waits for running tasks but never signals them, and its pool processes are killed anyway by whoever
    stops the worker a few seconds later (supervisord, systemd, Kubernetes). SIGTERM reaches the engine's handler in
    the pool process: it finishes its step, writes a checkpoint and returns "preempted"; the runner records the
    preemption and queues the job again, so the next worker continues from that checkpoint instead of waiting
    for the lease to expire and repeating every step since the last periodic checkpoint.
    """
    from celery.worker import state

    for request in list(state.active_requests):
        pid = getattr(request, "worker_pid", None)
        # A solo/threads pool runs tasks in this very process: signalling it would turn this into a cold shutdown.
        if request.name in (TRAIN_TASK, LEGACY_TRAIN_TASK) and pid and pid != os.getpid():
            log.info("preempting training task %s in pool process %s", request.id, pid)
            with contextlib.suppress(ProcessLookupError):  # it just finished
                os.kill(pid, signal.SIGTERM)
