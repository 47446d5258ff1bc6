"""Who may see a report, and how one is requested.

A report is visible to whoever may see its job (``builder.jobs.access``: the owner and the users the job is
shared with); everyone else gets a 404, never a 403. Only the job's owner requests an evaluation (it spends worker
time), like cancel and resume.

``request_report`` is idempotent: one report per (job, checkpoint step). Asking again for a checkpoint whose
report is queued, running or done returns that report (a queued one's task is sent again); a failed one (or one
whose worker went silent for ``REPORT_TIMEOUT_SECONDS``) is queued again. Tasks are sent once the row is
committed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.http import Http404
from django.utils import timezone

from builder.core.errors import Refusal
from builder.jobs.access import visible_jobs
from builder.jobs.models import Job, JobState
from builder.jobs.runner import job_dir
from builder.reports.models import Report, ReportState, ReportTrigger

log = logging.getLogger(__name__)

# The states of a job whose checkpoint may be evaluated: it stopped, and nothing writes to its folder any more.
EVALUABLE_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class Requested:
    report: Report
    created: bool  # False: an existing report for that checkpoint was returned (or queued again)


def visible_reports(user: Any) -> QuerySet[Report]:
    if not user.is_authenticated:
        return Report.objects.none()
    return Report.objects.filter(job__in=visible_jobs(user).values("pk"))


def get_visible_report(user: Any, report_id: int) -> Report:
    report = visible_reports(user).select_related("job", "job__owner").filter(pk=report_id).first()
    if report is None:
        raise Http404("no such report")
    return report


def checkpoint_path(job_id: int, step: int) -> Path:
    """Where the trainer commits job ``job_id``'s checkpoint of ``step`` (``<job dir>/run/checkpoints/step-N``,
    see ``workers.engine.train``), on the machine that trained it."""
    from workers.engine.checkpoint import checkpoint_dir_name

    return job_dir(job_id) / "run" / "checkpoints" / checkpoint_dir_name(step)


def stale_before() -> Any:
    return timezone.now() - timedelta(seconds=settings.REPORT_TIMEOUT_SECONDS)


def request_report(
    job: Job, *, user: Any = None, step: int | None = None, trigger: str = ReportTrigger.REQUESTED
) -> Requested:
    """The report of ``job``'s checkpoint ``step`` (default: its last committed one), queued if it must run.

    A ``Refusal`` when the job is still active or has no checkpoint (409, with the job's ``state``), or when
    ``step`` is not one of its checkpoint steps that can still exist (after the last one; 400, field ``step``).
    """
    job.refresh_from_db()
    if job.state not in EVALUABLE_JOB_STATES:
        raise Refusal("", f"the job is {job.state}: a report needs a job that has stopped", 409, state=job.state)
    if job.last_checkpoint_step is None:
        raise Refusal("", "the job has no checkpoint to evaluate", 409, state=job.state)
    if step is None:
        step = job.last_checkpoint_step
    elif step > job.last_checkpoint_step:
        raise Refusal("step", f"the job's last checkpoint is at step {job.last_checkpoint_step}")
    else:
        _check_kept(job, step)
    with transaction.atomic():
        report = Report.objects.select_for_update().filter(job=job, checkpoint_step=step).first()
        if report is None:
            try:
                with transaction.atomic():  # a savepoint: a concurrent request may have created it
                    report = Report.objects.create(
                        job=job, checkpoint_step=step, trigger=trigger, requested_by=user if user else None
                    )
            except IntegrityError:
                report = Report.objects.get(job=job, checkpoint_step=step)
            else:
                _dispatch(report)
                return Requested(report, created=True)
        # Queued again: a failure, or a claim whose worker has been silent too long (it died mid-evaluation).
        requeued = Report.objects.filter(pk=report.pk).filter(
            Q(state=ReportState.FAILED) | Q(state=ReportState.RUNNING, started_at__lt=stale_before())
        )
        requeued.update(state=ReportState.QUEUED, error="", finished_at=None)
        report.refresh_from_db()
        if report.state == ReportState.QUEUED:
            # Queued again just now, or still waiting, perhaps for a message lost in a broker restart: send the
            # task (again). A duplicate is harmless: the claim is a conditional update.
            _dispatch(report)
    return Requested(report, created=False)


def _check_kept(job: Job, step: int) -> None:
    """Refuse a step with no checkpoint on disk, when this machine holds the job's folder (one machine, or a
    shared JOBS_WORK_DIR); elsewhere the worker finds out and the report fails with the same reason."""
    from workers.engine.checkpoint import checkpoint_step, list_checkpoints

    root = checkpoint_path(job.pk, step).parent
    if not root.is_dir():
        return
    kept = [checkpoint_step(path) for path in list_checkpoints(root)]
    if step not in kept:
        steps = ", ".join(str(k) for k in kept) or "none"
        raise Refusal("step", f"no checkpoint of step {step} is kept; the job's checkpoints: {steps}")


def _dispatch(report: Report) -> None:
    """Send the evaluation once the row is committed, to the queue the job trained on: the worker there has the
    job's folder (checkpoints, prepared data), and the latency measured is that of the device that trained."""
    from workers.tasks import evaluate_report

    report_id, queue = report.pk, report.job.queue
    transaction.on_commit(lambda: evaluate_report.apply_async(args=(report_id,), queue=queue))


# A report whose worker died is sent again this many times in all before it is failed with the reason.
MAX_ATTEMPTS = 3


def reap_stale_reports() -> list[int]:
    """Reports left ``running`` by a worker that went silent (past ``REPORT_TIMEOUT_SECONDS``; run by beat).

    One with attempts left is sent again: a stale running report is claimable, so the next worker takes it over.
    One that used its attempts is failed with the reason (conditional on its state and attempts, so a worker
    finishing at that moment keeps its result). Returns the ids handled.
    """
    from workers.tasks import evaluate_report

    handled = []
    for report in Report.objects.filter(state=ReportState.RUNNING, started_at__lt=stale_before()).select_related("job"):
        if report.attempts >= MAX_ATTEMPTS:
            Report.objects.filter(pk=report.pk, state=ReportState.RUNNING, attempts=report.attempts).update(
                state=ReportState.FAILED,
                error=f"its worker stopped answering {report.attempts} times (no result within "
                f"{settings.REPORT_TIMEOUT_SECONDS} s); request it again",
                finished_at=timezone.now(),
            )
        else:
            evaluate_report.apply_async(args=(report.pk,), queue=report.job.queue)
        handled.append(report.pk)
    return handled


def redeliver_queued(queues: list[str]) -> list[int]:
    """Send the evaluation of every queued report whose job trained on one of ``queues`` again (at worker start:
    a report queued while the broker was down has no message). Duplicates are harmless: the claim is conditional.
    Returns the report ids."""
    from workers.tasks import evaluate_report

    rows = list(
        Report.objects.filter(state=ReportState.QUEUED, job__queue__in=queues)
        .order_by("created_at", "id")
        .values_list("pk", "job__queue")
    )
    for report_id, queue in rows:
        evaluate_report.apply_async(args=(report_id,), queue=queue)
    return [report_id for report_id, _ in rows]


def after_job_succeeded(job_id: int) -> None:
    """The hook the training runner calls once a job's success is committed: evaluate its final checkpoint.

    Never raises: a report that cannot be queued must not turn a finished training run into a failure.
    """
    if not settings.REPORTS_AUTO_EVALUATE:
        return
    try:
        job = Job.objects.get(pk=job_id)
        request_report(job, trigger=ReportTrigger.AUTOMATIC)
    except Exception:
        log.warning("could not queue the report of job %s", job_id, exc_info=True)
