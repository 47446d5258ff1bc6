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
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Max, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from builder.core.durable import Claim, WorkKind, register
from builder.core.errors import Refusal
from builder.jobs.models import ACTIVE_STATES, TERMINAL_STATES, Job, JobEvent, JobState
from builder.jobs.signals import job_ended

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
        if to in TERMINAL_STATES:
            transaction.on_commit(lambda: _announce_end(job_id, str(to)))
    return True


def _announce_end(job_id: int, state: str) -> None:
    """Tell the apps above (``job_ended``) that the job ended; their errors are logged, never raised: an ended job
    stays ended whatever a listener does with it."""
    for receiver, outcome in job_ended.send_robust(sender=Job, job_id=job_id, state=state):
        if isinstance(outcome, Exception):
            log.warning("job %s: %r failed on its end", job_id, receiver, exc_info=outcome)


TRAIN_TASK = "jobs.train"  # workers.tasks.jobs


class JobWork(WorkKind[Job]):
    """Jobs as durable work: the lease is renewed by the runner's heartbeat every ``JOB_HEARTBEAT_SECONDS``; every
    state change goes through ``transition`` (an event and a message on the job's stream)."""

    label = "job"
    model = Job
    task = TRAIN_TASK
    queued_state = JobState.QUEUED
    working_states = frozenset({JobState.RUNNING})
    claim_state = JobState.RUNNING
    failed_state = JobState.FAILED

    def lease_seconds(self) -> int:
        return int(settings.JOB_LEASE_SECONDS)

    def queue_of(self, row: Job) -> str:
        return row.queue

    def claimable(self) -> Q:
        return Q(cancel_requested=False)

    def attempts_left(self, row: Job) -> bool:
        return row.attempts < row.max_attempts

    def claim_fields(self, now: Any) -> dict[str, Any]:
        return {
            "started_at": Coalesce(F("started_at"), now),
            # The run continues from the last committed checkpoint: progress goes back to it.
            "step": Coalesce(F("last_checkpoint_step"), Value(0)),
        }

    def queued_rows(self) -> QuerySet[Job]:
        return Job.objects.filter(state=JobState.QUEUED).order_by("created_at", "id")

    def choose(self, pk: int) -> list[int]:
        """Fair share: the queued jobs of ``pk``'s class in the order they should run (``fair_order``), so that a
        delivery runs the job of the user who has the fewest running on the class, not the oldest message."""
        queue = Job.objects.filter(pk=pk).values_list("queue", flat=True).first()
        if queue is None:
            return [pk]
        order = list(fair_order(queue).values_list("pk", flat=True)[:FAIR_SHARE_CANDIDATES])
        return order if pk in order else [*order, pk]

    def stale_reason(self, row: Job) -> str:
        return f"lease of {row.lease_owner or 'a worker'} expired (no heartbeat for {settings.JOB_LEASE_SECONDS} s)"

    def requeue(self, row: Job, reason: str) -> bool:
        if row.cancel_requested:
            # Asked to stop (by its owner, or a sweep's pruner) before its worker died: it ends cancelled. Queued
            # again it would wait forever, since a job with a cancel requested is never claimed.
            return transition(
                row.pk, JobState.CANCELLED, token=row.lease_token, reason=cancel_reason(row.pk), lease_owner=""
            )
        with transaction.atomic():
            done = transition(row.pk, JobState.QUEUED, token=row.lease_token, reason=reason, lease_owner="")
            if done:
                self.dispatch(row)
        return done

    def give_up(self, row: Job, reason: str) -> bool:
        return transition(row.pk, JobState.FAILED, token=row.lease_token, reason=reason, error=reason)


# How many of the fairest queued jobs a delivery tries before giving up (each try is one conditional update; a
# miss means another worker took that job at the same moment).
FAIR_SHARE_CANDIDATES = 20


def fair_order(queue: str) -> QuerySet[Job]:
    """The claimable queued jobs of hardware class ``queue``, in the order fair share runs them:

    1. the owner's running jobs on the class, fewest first (no user holds the class while another waits);
    2. the owner's last activity on the class (the newest heartbeat of any of their jobs there), longest ago first,
       never first: users take turns, so a user who queued many jobs gets every other run, not all of them;
    3. when the job entered the queue, then its id (one user's own jobs run in the order they were queued).
    """
    of_owner_here = Job.objects.filter(owner=OuterRef("owner"), queue=queue).values("owner")
    running = of_owner_here.filter(state=JobState.RUNNING).annotate(n=Count("pk")).values("n")
    last_active = of_owner_here.filter(heartbeat_at__isnull=False).annotate(at=Max("heartbeat_at")).values("at")
    return (
        Job.objects.filter(JOBS.claimable(), state=JobState.QUEUED, queue=queue)
        .annotate(owner_running=Coalesce(Subquery(running), Value(0)), owner_last_active=Subquery(last_active))
        .order_by("owner_running", F("owner_last_active").asc(nulls_first=True), "queued_at", "pk")
    )


JOBS = register(JobWork())


@dataclass(frozen=True)
class Lease(Claim):
    """A job's claim, with the checkpoint step the run resumes from (None: a fresh start)."""

    resume_from: int | None = None

    @property
    def job_id(self) -> int:
        return self.pk


def claim(job_id: int, worker: str) -> Lease | None:
    """Take the queued job of ``job_id``'s class that fair share runs next (``fair_order``: often ``job_id`` itself)
    for ``worker``; the lease's ``job_id`` says which. None when none is claimable (taken, cancelled, finished).

    The points an earlier attempt recorded past where this one resumes are dropped by this attempt's sink
    (``DatabaseStreamSink``) once the engine says where it resumes: a checkpoint can be on disk a moment before
    the database hears of it, so ``last_checkpoint_step`` is only the progress shown until then.
    """
    with transaction.atomic():
        taken = JOBS.claim_next(job_id, worker)
        if taken is None:
            return None
        job_id = taken.pk  # fair share may hand this delivery another queued job of the same class
        resume_from = Job.objects.values_list("last_checkpoint_step", flat=True).get(pk=job_id)
        add_event(
            job_id,
            "state",
            {"from": "queued", "to": "running", "worker": worker, "attempt": taken.attempt, "resume_from": resume_from},
            step=resume_from or 0,
        )
        _publish_after_commit(job_id, {"type": "state", "state": "running", "reason": f"claimed by {worker}"})
    return Lease(pk=job_id, token=taken.token, attempt=taken.attempt, worker=worker, resume_from=resume_from)


def heartbeat(lease: Lease, step: int | None = None) -> bool:
    """Renew the lease. False means the lease was lost: the worker must stop without writing more."""
    return JOBS.heartbeat(lease) if step is None else JOBS.heartbeat(lease, step=step)


def dispatch(job: Job) -> None:
    """Send the job's task once the row is committed (a task must never see a job that does not exist yet)."""
    JOBS.dispatch(job)


CANCELLED_BY_OWNER = "cancelled by its owner"


def request_cancel(job: Job, reason: str = "") -> None:
    """Cancel a job: at once if it is not running; otherwise the worker stops within a step and checkpoints.

    ``reason`` (default: cancelled by its owner) is what the job's final state change says, e.g. "pruned: ..." for
    a sweep's trial. A job that already ended is a ``Refusal`` (409, with the job's ``state``)."""
    if job.state in (JobState.QUEUED, JobState.PREEMPTED) and transition(
        job.pk, JobState.CANCELLED, reason=reason or "cancelled before it ran"
    ):
        return
    if job.is_terminal:
        raise Refusal("", f"the job already {job.state}", 409, state=job.state)
    Job.objects.filter(pk=job.pk).update(cancel_requested=True)
    add_event(job.pk, "cancel_requested", {"reason": reason} if reason else {}, step=job.step)


def cancel_reason(job_id: int) -> str:
    """Why the job was asked to stop: the reason of its latest ``cancel_requested`` event, or cancelled by its owner."""
    data = (
        JobEvent.objects.filter(job_id=job_id, kind="cancel_requested").order_by("-seq").values_list("data", flat=True)
    )
    latest = data.first() or {}
    return str(latest.get("reason") or CANCELLED_BY_OWNER)


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


def reap_expired_leases() -> list[int]:
    """Re-queue running jobs whose worker stopped heartbeating; fail those out of attempts. Returns their ids."""
    return JOBS.reap()


def jobs_training_on(dataset: Any) -> str:
    """A dataset deletion guard (registered in ``builder.datasets.services.deletion_guards`` by the app): a queued
    or running job reads the file (a preempted one will again), so deleting it would fail the job."""
    active = list(Job.objects.filter(dataset=dataset, state__in=ACTIVE_STATES).values_list("pk", flat=True)[:5])
    if not active:
        return ""
    ids = ", ".join(f"#{pk}" for pk in active)
    return f"jobs {ids} are training on this dataset; cancel them or wait for them to finish"


def queue_position(job: Job) -> int | None:
    """1 for the next job to run on its class (in fair-share order, ``fair_order``); None when it is not queued."""
    if job.state != JobState.QUEUED:
        return None
    order = list(fair_order(job.queue).values_list("pk", flat=True))
    return order.index(job.pk) + 1 if job.pk in order else None
