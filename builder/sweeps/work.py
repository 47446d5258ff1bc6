"""Sweeps as durable work (``builder.core.durable``): a worker claims a sweep to run one tick
(``builder.sweeps.runner.run_tick``), renewed by a heartbeat while it ticks, taken over by another worker when it
goes silent, and failed with the reason after its attempts.

What asks for a tick: a trial's job that ended (``builder.jobs.signals.job_ended``), beat's poll of the sweeps that
wait (it drives the pruner while trials train), a stop, and the creation of the sweep. ``request_tick`` is safe to
call from anywhere at any time: a sweep already queued stays queued (one message), and one that is ticking is marked
``tick_again`` so that its tick queues the next one when it ends (nothing asked for during a tick is lost).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet

from builder.core.durable import WorkKind, register
from builder.sweeps.models import FINAL_SWEEP_STATES, Sweep, SweepState, Trial

log = logging.getLogger(__name__)

TICK_TASK = "sweeps.tick"  # workers.tasks.sweeps
POLL_TASK = "sweeps.poll"
# Ticks are short bookkeeping (no training): they run on the cpu queue, never behind a training run.
TICK_QUEUE = "cpu"


class SweepWork(WorkKind[Sweep]):
    label = "sweep"
    model = Sweep
    task = TICK_TASK
    queued_state = SweepState.QUEUED
    working_states = frozenset({SweepState.TICKING})
    claim_state = SweepState.TICKING
    failed_state = SweepState.FAILED
    # Claims in a row that ended without a tick completing (a successful tick resets the count).
    max_attempts = 3

    def lease_seconds(self) -> int:
        return int(settings.SWEEP_TICK_LEASE_SECONDS)

    def queue_of(self, row: Sweep) -> str:
        return TICK_QUEUE

    def claim_fields(self, now: Any) -> dict[str, Any]:
        return {"tick_again": False}

    def final_fields(self, now: Any) -> dict[str, Any]:
        return {"finished_at": now}

    def stale_reason(self, row: Sweep) -> str:
        return (
            f"its tick's worker {row.lease_owner or ''} stopped answering (no heartbeat for {self.lease_seconds()} s)"
        )


SWEEPS = register(SweepWork())


def group_name(sweep_id: int) -> str:
    return f"sweep-{sweep_id}"


def publish(sweep_id: int) -> None:
    """Tell the sweep's page that it changed (it reads the new state from the database). Best effort: a page that
    misses one catches up at the next."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group_name(sweep_id), {"type": "sweep.changed", "sent_at": time.time()})
    except Exception:
        log.warning("could not publish to sweep %s's group", sweep_id, exc_info=True)


def request_tick(sweep_id: int) -> bool:
    """Ask for a tick of the sweep. True when this call queued it (and sent its task once the transaction commits)."""
    with transaction.atomic():
        live = Sweep.objects.filter(pk=sweep_id).exclude(state__in=FINAL_SWEEP_STATES)
        live.filter(state=SweepState.TICKING).update(tick_again=True)
        queued = bool(live.filter(state=SweepState.WAITING).update(state=SweepState.QUEUED))
        if queued:
            SWEEPS.dispatch(Sweep.objects.get(pk=sweep_id))
    return queued


def waiting_sweeps() -> QuerySet[Sweep]:
    return Sweep.objects.filter(state=SweepState.WAITING).order_by("pk")


def poll() -> list[int]:
    """Beat's round: a tick for every waiting sweep (the pruner sees its trials' new validation points)."""
    return [pk for pk in waiting_sweeps().values_list("pk", flat=True) if request_tick(pk)]


def after_job_ended(job_id: int, **_: Any) -> None:
    """Receiver of ``builder.jobs.signals.job_ended``: tick the sweep of the trial the job ran, if any."""
    sweep_id = Trial.objects.filter(job_id=job_id).values_list("sweep_id", flat=True).first()
    if sweep_id is not None:
        request_tick(sweep_id)
