"""The job state machine, in one place: every state change is a conditional UPDATE made here.

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled | preempted
      ▲                  │ lease expired (reaper), attempts left
      └──────────────────┘
    failed | cancelled | preempted ──resume──▶ queued

A claim increments the job's ``lease_token`` (a fencing token). Every later write by that worker (heartbeat,
metric points, events, the final state) is conditional on the token still being the job's, so a worker that lost
its lease (it stalled past the timeout and the job went to another worker) can no longer change anything.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from builder.core.errors import Refusal
from builder.jobs.models import Job, JobEvent, JobState

log = logging.getLogger(__name__)

# Which states each state may be entered from. Anything else is refused.
ENTERED_FROM: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED}),
    JobState.RUNNING: frozenset({JobState.QUEUED, JobState.PREEMPTED}),
    JobState.SUCCEEDED: frozenset({JobState.RUNNING}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.PREEMPTED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.PREEMPTED}),
    JobState.PREEMPTED: frozenset({JobState.RUNNING}),
}


def group_name(job_id: int) -> str:
    return f"job-{job_id}"


def publish(job_id: int, message: dict[str, Any]) -> None:
    """Send ``message`` to the job's Channels group. Best effort: the database is the record, and clients
    that miss a message resynchronise from it, so a broker hiccup must never fail the training run."""
    layer = get_channel_layer()
    if layer is None:
        return
    # The publication time travels with the message: clients measure the stream's latency from it.
    stamped = {**message, "sent_at": time.time()}
    try:
        async_to_sync(layer.group_send)(group_name(job_id), {"type": "job.message", "message": stamped})
    except Exception:
        log.warning("could not publish to job %s's group", job_id, exc_info=True)


def _publish_after_commit(job_id: int, message: dict[str, Any]) -> None:
    transaction.on_commit(lambda: publish(job_id, message))


def add_event(job_id: int, kind: str, data: dict[str, Any], step: int = 0, token: int | None = None) -> bool:
    """Store an event with the job's next event sequence number, then stream it.

    With ``token``, the write is fenced: it is refused (returns False) when the lease has moved on.
    """
    with transaction.atomic():
        jobs = Job.objects.filter(pk=job_id)
        if token is not None:
            jobs = jobs.filter(lease_token=token)
        if not jobs.update(event_seq=F("event_seq") + 1):
            return False
        seq = Job.objects.values_list("event_seq", flat=True).get(pk=job_id)
        event = JobEvent.objects.create(job_id=job_id, seq=seq, step=step, kind=kind, data=data)
        _publish_after_commit(job_id, {"type": "event", "event": event_payload(event)})
    return True


def event_payload(event: JobEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "step": event.step,
        "kind": event.kind,
        "data": event.data,
        "at": event.created_at.isoformat(),
    }


# What a person may resume: a job that stopped. (A running job is re-queued only by the reaper, never by hand:
# that would hand a live worker's job to a second worker.)
RESUMABLE = frozenset({JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED})


def transition(
    job_id: int,
    to: JobState,
    *,
    token: int | None = None,
    reason: str = "",
    only_from: frozenset[JobState] | None = None,
    **fields: Any,
) -> bool:
    """Move the job to ``to`` if its current state allows it (and, with ``token``, if the lease is still held;
    with ``only_from``, if the current state is also one of those).

    Returns whether the change happened; records a ``state`` event when it did.
    """
    with transaction.atomic():
        row = Job.objects.filter(pk=job_id).values_list("state", "step").first()
        if row is None:
            return False
        current, step = row
        allowed = ENTERED_FROM[to] if only_from is None else ENTERED_FROM[to] & only_from
        jobs = Job.objects.filter(pk=job_id, state__in=allowed)
        if token is not None:
            jobs = jobs.filter(lease_token=token)
        if to in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
            fields.setdefault("finished_at", timezone.now())
        elif to == JobState.QUEUED:
            fields.setdefault("queued_at", timezone.now())
        if not jobs.update(state=to, **fields):
            return False
        add_event(job_id, "state", {"from": current, "to": str(to), "reason": reason}, step=fields.get("step", step))
        _publish_after_commit(job_id, {"type": "state", "state": str(to), "reason": reason})
    return True


@dataclass(frozen=True)
class Lease:
    job_id: int
    token: int
    attempt: int
    resume_from: int | None


def claim(job_id: int, worker: str) -> Lease | None:
    """Take a queued job for ``worker``. None when it is not claimable (already taken, cancelled, finished).

    The points an earlier attempt recorded past where this one resumes are dropped by this attempt's sink
    (``DatabaseStreamSink``) once the engine says where it resumes: a checkpoint can be on disk a moment before
    the database hears of it, so ``last_checkpoint_step`` is only the progress shown until then.
    """
    now = timezone.now()
    with transaction.atomic():
        claimed = Job.objects.filter(pk=job_id, state=JobState.QUEUED, cancel_requested=False).update(
            state=JobState.RUNNING,
            lease_owner=worker,
            lease_token=F("lease_token") + 1,
            heartbeat_at=now,
            attempts=F("attempts") + 1,
            started_at=Coalesce(F("started_at"), now),
            # The run continues from the last committed checkpoint: progress goes back to it.
            step=Coalesce(F("last_checkpoint_step"), Value(0)),
        )
        if not claimed:
            return None
        job = Job.objects.get(pk=job_id)
        resume_from = job.last_checkpoint_step
        add_event(
            job_id,
            "state",
            {"from": "queued", "to": "running", "worker": worker, "attempt": job.attempts, "resume_from": resume_from},
            step=resume_from or 0,
        )
        _publish_after_commit(job_id, {"type": "state", "state": "running", "reason": f"claimed by {worker}"})
    return Lease(job_id, job.lease_token, job.attempts, resume_from)


def heartbeat(lease: Lease, step: int | None = None) -> bool:
    """Renew the lease. False means the lease was lost: the worker must stop without writing more."""
    fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
    if step is not None:
        fields["step"] = step
    return bool(Job.objects.filter(pk=lease.job_id, lease_token=lease.token, state=JobState.RUNNING).update(**fields))


def dispatch(job: Job) -> None:
    """Send the job's task once the row is committed (a task must never see a job that does not exist yet)."""
    from workers.tasks import train_job

    job_id, queue = job.pk, job.queue
    transaction.on_commit(lambda: train_job.apply_async(args=(job_id,), queue=queue))


def redeliver_queued(queues: list[str]) -> list[int]:
    """Send the task of every queued job on ``queues`` again (at worker start); returns their ids, oldest first."""
    from workers.tasks import train_job

    ids = list(
        Job.objects.filter(state=JobState.QUEUED, queue__in=queues)
        .order_by("created_at", "id")
        .values_list("pk", "queue")
    )
    for job_id, queue in ids:
        train_job.apply_async(args=(job_id,), queue=queue)
    return [job_id for job_id, _ in ids]


def request_cancel(job: Job) -> None:
    """Cancel a job: at once if it is not running; otherwise the worker stops within a step and checkpoints.

    A job that already ended is a ``Refusal`` (409, with the job's ``state``)."""
    if job.state in (JobState.QUEUED, JobState.PREEMPTED) and transition(
        job.pk, JobState.CANCELLED, reason="cancelled before it ran"
    ):
        return
    if job.is_terminal:
        raise Refusal("", f"the job already {job.state}", 409, state=job.state)
    Job.objects.filter(pk=job.pk).update(cancel_requested=True)
    add_event(job.pk, "cancel_requested", {}, step=job.step)


def resume(job: Job) -> None:
    """Queue a stopped job again; it continues from its last committed checkpoint with fresh attempts.

    A job that is not stopped is a ``Refusal`` (409, with the job's ``state``)."""
    resumed = transition(
        job.pk,
        JobState.QUEUED,
        reason="resumed",
        only_from=RESUMABLE,
        attempts=0,
        cancel_requested=False,
        error="",
        finished_at=None,
    )
    if not resumed:
        raise Refusal("", f"a {job.state} job cannot be resumed", 409, state=job.state)
    job.refresh_from_db()
    dispatch(job)


def lease_timeout() -> timedelta:
    return timedelta(seconds=settings.JOB_LEASE_SECONDS)


def reap_expired_leases() -> list[int]:
    """Re-queue running jobs whose worker stopped heartbeating; fail those out of attempts. Returns their ids."""
    cutoff = timezone.now() - lease_timeout()
    reaped: list[int] = []
    for job in Job.objects.filter(state=JobState.RUNNING, heartbeat_at__lt=cutoff):
        reason = f"lease of {job.lease_owner or 'a worker'} expired (no heartbeat for {settings.JOB_LEASE_SECONDS} s)"
        if job.attempts >= job.max_attempts:
            done = transition(
                job.pk,
                JobState.FAILED,
                token=job.lease_token,
                reason=reason,
                error=f"gave up after {job.attempts} attempts: {reason}",
            )
        else:
            with transaction.atomic():
                done = transition(job.pk, JobState.QUEUED, token=job.lease_token, reason=reason, lease_owner="")
                if done:
                    dispatch(job)
        if done:
            reaped.append(job.pk)
    return reaped


def queue_position(job: Job) -> int | None:
    """1 for the next job to run on its queue; None when the job is not queued."""
    if job.state != JobState.QUEUED:
        return None
    ahead = Job.objects.filter(state=JobState.QUEUED, queue=job.queue).filter(
        Q(queued_at__lt=job.queued_at) | Q(queued_at=job.queued_at, pk__lt=job.pk)
    )
    return ahead.count() + 1
