"""One way to do durable work: claim, heartbeat, finish, reap, redeliver. Jobs, reports, hardware calibrations and
dataset processing all use it; each app describes its rows with a ``WorkKind``.

    queued ──claim──▶ working ──finish (fenced)──▶ a final state
      ▲                  │ heartbeat older than the kind's lease (the reaper, run by beat)
      └── attempts left ─┤
                         └── no attempts left ──▶ failed, with the reason

The database is the record and the broker only delivers:

- **claim** is one conditional UPDATE (queued → working, ``lease_token + 1``, ``attempts + 1``): of two workers that
  received the same message, one gets the row; the other gets ``None`` and returns at once, so duplicates are
  harmless and a message may always be sent again. A kind may let a delivery claim another queued row of the same
  queue instead (``choose``/``claim_next``: jobs do, for fair share between users); a message then stands for "run
  the next row of this queue", and there are never fewer messages than queued rows.
- every later write by the claimant (**heartbeat**, progress, **finish**) is conditional on its token still being
  the row's, so a worker that was presumed dead (its row reaped and claimed by another) can change nothing.
- **reap** (beat) hands rows whose worker went silent back to the queue, or fails them with the reason once their
  attempts are spent; **redeliver** sends the task again for every queued row (at worker start: a row queued
  while the broker was down has no message), and beat sends it again for a row that has waited in the queue
  longer than ``REDELIVER_AFTER_SECONDS`` since it was last sent (a message lost with a Redis that restarted).
  A duplicate costs one claim that finds the row taken; a row waits that long only behind long work, so each
  queued row is sent at most once per ``REDELIVER_AFTER_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Generic, TypeVar

from django.db import connection, models, transaction
from django.db.models import F, Q
from django.utils import timezone

from builder.core.enqueue import enqueue_on_commit, send

log = logging.getLogger(__name__)


class WorkState(models.TextChoices):
    """The states of work with one outcome (reports, calibrations). Jobs and datasets have richer sets."""

    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class DurableWork(models.Model):
    """The fields every kind of durable work has: its attempts and the lease of the worker that holds it."""

    attempts = models.PositiveIntegerField(default=0)  # claims so far (reset when a person queues the row again)
    # The lease: which worker holds the row, with a fencing token that grows at every claim. A worker whose token
    # is no longer the row's has lost it and must not write anything more.
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_token = models.PositiveBigIntegerField(default=0)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # When the row's task was last sent: beat sends it again when the row is still queued long after.
    dispatched_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True


W = TypeVar("W", bound=DurableWork)


@dataclass(frozen=True)
class Claim:
    """What a worker holds after a claim: the fencing token of every later write, and which attempt this is."""

    pk: int
    token: int
    attempt: int
    worker: str


class WorkKind(Generic[W]):
    """How one model's rows are worked on: its task, queue, states, lease and attempts.

    Subclass it once per model and register an instance (``register``); override the hooks where a kind records
    more than the generic update (jobs record an event and stream every state change).
    """

    label: ClassVar[str]  # for logs and messages: "job", "report" ...
    model: type[W]
    task: ClassVar[str]  # the Celery task name sent with the row's id
    queued_state: ClassVar[str] = WorkState.QUEUED
    working_states: ClassVar[frozenset[str]] = frozenset({WorkState.RUNNING})
    claim_state: ClassVar[str] = WorkState.RUNNING
    failed_state: ClassVar[str] = WorkState.FAILED
    error_field: ClassVar[str] = "error"
    max_attempts: ClassVar[int] = 3

    # -- what each kind says --------------------------------------------------------------------------------------

    def lease_seconds(self) -> int:
        """How long a working row may go without a heartbeat before its worker is taken to be dead."""
        raise NotImplementedError

    def queue_of(self, row: W) -> str:
        """The queue the row's task is sent to."""
        raise NotImplementedError

    def task_of(self, row: W) -> str:
        """The task sent for the row (a kind with several tasks chooses by the row)."""
        return self.task

    def claimable(self) -> Q:
        """What a queued row must also satisfy to be claimed (jobs: no cancel requested)."""
        return Q()

    def choose(self, pk: int) -> list[int]:
        """The queued rows a delivery of ``pk``'s task tries to claim, in order (default: ``pk`` alone).

        A kind whose rows share a queue may hand the delivery to the row that should run next (jobs: fair share
        between users). Nothing is lost: every queued row was sent its own message, so the row a delivery passes
        over is run by the message of the row it took, and a delivery that finds nothing queued returns.
        """
        return [pk]

    def attempts_left(self, row: W) -> bool:
        return row.attempts < self.max_attempts

    def claim_fields(self, now: Any) -> dict[str, Any]:
        """Fields a claim sets besides the lease (e.g. ``started_at``)."""
        return {}

    def final_fields(self, now: Any) -> dict[str, Any]:
        """Fields set when the row reaches a final state (e.g. ``finished_at``)."""
        return {"finished_at": now}

    # -- sending ---------------------------------------------------------------------------------------------------

    def dispatch(self, row: W) -> None:
        """Send the row's task once the current transaction commits (and note when, for redelivery)."""
        self.model._default_manager.filter(pk=row.pk).update(dispatched_at=timezone.now())
        enqueue_on_commit(self.task_of(row), row.pk, queue=self.queue_of(row))

    def redeliver_overdue(self, after_seconds: float) -> list[int]:
        """Send the task again for every row still queued ``after_seconds`` after it was last sent (beat)."""
        cutoff = timezone.now() - timedelta(seconds=after_seconds)
        overdue = Q(dispatched_at__lt=cutoff) | Q(dispatched_at__isnull=True)
        sent = []
        for row in self.queued_rows().filter(overdue):
            # Conditional on the time read, so that two beats (or a beat and a worker start) send it once.
            if self.model._default_manager.filter(pk=row.pk, dispatched_at=row.dispatched_at).update(
                dispatched_at=timezone.now()
            ):
                send(self.task_of(row), row.pk, queue=self.queue_of(row))
                sent.append(row.pk)
        return sent

    def redeliver_queued(self, queues: Iterable[str] | None = None) -> list[int]:
        """Send the task again for every queued row (on ``queues``, when given), oldest first; returns their ids.

        Duplicates are harmless: the claim is conditional, so a second delivery finds the row taken.
        """
        wanted = None if queues is None else set(queues)
        sent = []
        for row in self.queued_rows():
            queue = self.queue_of(row)
            if wanted is None or queue in wanted:
                self.model._default_manager.filter(pk=row.pk).update(dispatched_at=timezone.now())
                send(self.task_of(row), row.pk, queue=queue)
                sent.append(row.pk)
        return sent

    def queued_rows(self) -> models.QuerySet[W]:
        return self.model._default_manager.filter(state=self.queued_state).order_by("pk")

    # -- the claimant's writes ------------------------------------------------------------------------------------

    def claim(self, pk: int, worker: str, *, state: str | None = None, **fields: Any) -> Claim | None:
        """Take queued row ``pk`` for ``worker`` (into ``state``, default ``claim_state``); None when it is not
        queued (taken, cancelled, finished, deleted). ``fields`` are set by the same conditional update."""
        now = timezone.now()
        manager = self.model._default_manager
        with transaction.atomic():
            taken = manager.filter(self.claimable(), pk=pk, state=self.queued_state).update(
                state=state or self.claim_state,
                lease_owner=worker,
                lease_token=F("lease_token") + 1,
                attempts=F("attempts") + 1,
                heartbeat_at=now,
                **self.claim_fields(now),
                **fields,
            )
            if not taken:
                return None
            # Read inside the transaction: the row is ours until it commits, so these are our claim's numbers.
            token, attempt = manager.filter(pk=pk).values_list("lease_token", "attempts").get()
        return Claim(pk=pk, token=token, attempt=attempt, worker=worker)

    def claim_next(self, pk: int, worker: str, **fields: Any) -> Claim | None:
        """Claim the first row of ``choose(pk)`` that is still queued (another worker may take one between the
        choice and the conditional update: the next is tried); None when none is."""
        for candidate in self.choose(pk):
            taken = self.claim(candidate, worker, **fields)
            if taken is not None:
                return taken
        return None

    def held(self, pk: int, token: int) -> models.QuerySet[W]:
        """Row ``pk`` while the lease with ``token`` still holds it (working, with that token): every fenced write
        goes through this."""
        return self.model._default_manager.filter(pk=pk, lease_token=token, state__in=self.working_states)

    def mine(self, claim: Claim) -> models.QuerySet[W]:
        """The row, while ``claim`` still holds it."""
        return self.held(claim.pk, claim.token)

    def heartbeat(self, claim: Claim, **fields: Any) -> bool:
        """Renew the lease (and write ``fields``). False: the lease was lost; the worker must stop writing."""
        return bool(self.mine(claim).update(heartbeat_at=timezone.now(), **fields))

    def finish(self, claim: Claim, state: str, **fields: Any) -> bool:
        """Record the outcome: move the row to ``state`` if ``claim`` still holds it."""
        fields = {**self.final_fields(timezone.now()), **fields}
        return bool(self.mine(claim).update(state=state, **fields))

    # -- the reaper -----------------------------------------------------------------------------------------------

    def stale_rows(self) -> models.QuerySet[W]:
        cutoff = timezone.now() - timedelta(seconds=self.lease_seconds())
        # A working row with no heartbeat at all was claimed before this kind had one: it counts as silent.
        silent = Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True)
        return self.model._default_manager.filter(silent, state__in=self.working_states).order_by("pk")

    def stale_reason(self, row: W) -> str:
        return f"its worker {row.lease_owner or ''} stopped answering (no heartbeat for {self.lease_seconds()} s)"

    def reap(self) -> list[int]:
        """Queue again every row whose worker went silent, or fail it with the reason once its attempts are
        spent. Each change is conditional on the row's state and token, so a worker that finishes at that
        moment keeps its result. Returns the ids handled."""
        handled = []
        for row in self.stale_rows():
            reason = " ".join(self.stale_reason(row).split())
            if self.attempts_left(row):
                done = self.requeue(row, reason)
            else:
                done = self.give_up(row, f"gave up after {row.attempts} attempts: {reason}")
            if done:
                log.warning("%s %s: %s", self.label, row.pk, "queued again" if self.attempts_left(row) else reason)
                handled.append(row.pk)
        return handled

    def requeue(self, row: W, reason: str) -> bool:
        """Hand a silent worker's row back to the queue and send its task (hook: jobs record an event)."""
        with transaction.atomic():
            done = bool(self.held(row.pk, row.lease_token).update(state=self.queued_state, lease_owner=""))
            if done:
                self.dispatch(row)
        return done

    def give_up(self, row: W, reason: str) -> bool:
        """Fail a silent worker's row that used its attempts, with the reason (hook)."""
        fields = {**self.final_fields(timezone.now()), self.error_field: reason}
        return bool(self.held(row.pk, row.lease_token).update(state=self.failed_state, **fields))


def this_worker(hostname: str | None = None) -> str:
    """How a worker names itself in a lease: ``host:pid`` (Celery's node name for ``hostname`` when known)."""
    return f"{hostname or socket.gethostname()}:{os.getpid()}"


_registry: dict[str, WorkKind[Any]] = {}


def register(kind: WorkKind[W]) -> WorkKind[W]:
    """Make ``kind`` known to the reaper and to redelivery (each app registers its kinds when it is ready)."""
    _registry[kind.label] = kind
    return kind


def kinds() -> list[WorkKind[Any]]:
    return list(_registry.values())


def reap_all(redeliver_after: float | None = None) -> dict[str, list[int]]:
    """Beat's periodic round: every registered kind's reaper, then (with ``redeliver_after``) the redelivery of
    rows queued that long since they were last sent. Returns the ids handled per kind ("<label>" for the reaped,
    "<label>.redelivered" for the sent again)."""
    handled = {kind.label: kind.reap() for kind in kinds()}
    if redeliver_after is not None:
        handled.update({f"{kind.label}.redelivered": kind.redeliver_overdue(redeliver_after) for kind in kinds()})
    return handled


def redeliver_all(queues: Iterable[str] | None = None) -> dict[str, list[int]]:
    """Send the task again for every queued row of every kind on ``queues`` (a worker calls it when it starts)."""
    wanted = None if queues is None else list(queues)
    return {kind.label: kind.redeliver_queued(wanted) for kind in kinds()}


class Ticker(threading.Thread):
    """Calls ``beat`` every ``interval`` seconds in a daemon thread of its own until stopped; when ``beat`` returns
    False it sets ``lost`` and stops. Closes the thread's own database connection at the end."""

    def __init__(self, name: str, beat: Callable[[], bool], interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self.beat = beat
        self.interval = interval
        self.lost = threading.Event()
        self._stop_requested = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_requested.wait(self.interval):
                if not self.beat():
                    self.lost.set()
                    return
        finally:
            connection.close()  # this thread's own database connection

    def stop(self) -> None:
        self._stop_requested.set()
        self.join(timeout=10)

    def __enter__(self) -> Ticker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Heartbeat(Ticker):
    """Renews a claim every ``interval`` seconds whatever the work is doing (tokenizing a corpus or exporting a
    model takes minutes without a progress write). Sets ``lost`` when the claim is no longer ours."""

    def __init__(self, kind: WorkKind[Any], claim: Claim, interval: float) -> None:
        super().__init__(f"heartbeat-{kind.label}-{claim.pk}", lambda: kind.heartbeat(claim), interval)
        self.kind = kind
        self.claim = claim

    def __enter__(self) -> Heartbeat:
        self.start()
        return self
