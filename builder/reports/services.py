"""Who may see a report, and how one is requested.

A report is visible to whoever may see its job (``builder.jobs.access``: the owner and the users the job is
shared with); everyone else gets a 404, never a 403. Only the job's owner requests an evaluation (it spends worker
time), like cancel and resume.

``request_report`` is idempotent: one report per (job, checkpoint step). Asking again for a checkpoint whose
report is queued, running or done returns that report (a queued one's task is sent again); a failed one (or one
whose worker went silent for ``REPORT_TIMEOUT_SECONDS``) is queued again with fresh attempts. Tasks are sent once
the row is committed. Reports are durable work (``builder.reports.work``): the reaper and redelivery are there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.http import Http404

from builder.core.durable import WorkState
from builder.core.errors import Refusal
from builder.jobs.access import visible_jobs
from builder.jobs.files import job_layout
from builder.jobs.models import Job, JobState
from builder.jobs.remote import stored_checkpoint_steps
from builder.reports.models import Report, ReportTrigger
from builder.reports.work import REPORTS

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
    """Where the trainer commits job ``job_id``'s checkpoint of ``step`` (``workers.engine.layout``), on the
    machine that trained it."""
    return job_layout(job_id).run.checkpoint(step)


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
        raise Refusal("step", f"the job's last checkpoint is at step {job.last_checkpoint_step}", 409)
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
                REPORTS.dispatch(report)
                return Requested(report, created=True)
        # Queued again, with fresh attempts: a failure, or a claim whose worker has been silent too long (it died
        # mid-evaluation; the reaper would do the same at its next round).
        stale = REPORTS.stale_rows().order_by().values("pk")
        requeued = Report.objects.filter(pk=report.pk).filter(Q(state=WorkState.FAILED) | Q(pk__in=stale))
        requeued.update(state=WorkState.QUEUED, error="", finished_at=None, attempts=0, lease_owner="")
        report.refresh_from_db()
        if report.state == WorkState.QUEUED:
            # Queued again just now, or still waiting, perhaps for a message lost in a broker restart: send the
            # task (again). A duplicate is harmless: the claim is a conditional update.
            REPORTS.dispatch(report)
    return Requested(report, created=False)


def _check_kept(job: Job, step: int) -> None:
    """Refuse a step with no checkpoint kept: in storage (remote storage), or on disk when this machine holds the
    job's folder (one machine, or a shared JOBS_WORK_DIR); elsewhere the worker finds out and the report fails
    with the same reason."""
    from workers.engine.checkpoint import checkpoint_step, list_checkpoints

    kept = stored_checkpoint_steps(job.pk)
    if not kept:  # local storage, or a job that ran before S3 was set up (its folder, if it is on this machine)
        root = checkpoint_path(job.pk, step).parent
        if not root.is_dir():
            return
        kept = [checkpoint_step(path) for path in list_checkpoints(root)]
    if step not in kept:
        steps = ", ".join(str(k) for k in kept) or "none"
        # 409: the step is a well-formed number; the job's kept checkpoints (its state) do not include it.
        raise Refusal("step", f"no checkpoint of step {step} is kept; the job's checkpoints: {steps}", 409)


def after_job_succeeded(job_id: int, **_: Any) -> None:
    """Receiver of ``builder.jobs.signals.job_succeeded`` (connected by the app): evaluate the final checkpoint.

    Never raises: a report that cannot be queued must not turn a finished training run into a failure.
    """
    if not settings.REPORTS_AUTO_EVALUATE:
        return
    try:
        job = Job.objects.get(pk=job_id)
        request_report(job, trigger=ReportTrigger.AUTOMATIC)
    except Exception:
        log.warning("could not queue the report of job %s", job_id, exc_info=True)
