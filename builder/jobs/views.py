"""The jobs pages: the list, the live dashboard of one job, the overlay of several runs, and the launch form.

Every page shows only jobs the signed-in user may see (``access.visible_jobs``); any other id is a 404. The
dashboard is server-rendered around the job's summary; its charts are filled by ``frontend/src/jobs.js`` from the
websocket (history, then live batches). Cancel and resume are the API's endpoints, POSTed by the page.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db.models import OuterRef, Subquery
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods
from pydantic import ValidationError

from builder.accounts import audit
from builder.accounts.models import AuditAction
from builder.core.errors import Refusal
from builder.core.hardware_classes import queue_classes
from builder.core.parsers import db_int
from builder.core.ratelimit import retry_message
from builder.jobs import history
from builder.jobs.access import can_control, get_visible_job, visible_jobs
from builder.jobs.forms import LaunchForm
from builder.jobs.models import ACTIVE_STATES, MetricPoint
from builder.jobs.serializers import job_summary
from builder.jobs.submit import submit_job
from builder.jobs.throttling import submission_wait
from workers.engine.spec import load_spec

LIST_LIMIT = 200
# Metrics an overlay can plot (the ones that mean the same thing across runs), in menu order.
OVERLAY_METRICS = (
    ("loss", "Training loss"),
    ("val_loss", "Validation loss"),
    ("grad_norm", "Gradient norm"),
    ("lr", "Learning rate"),
    ("tokens_per_s", "Tokens/s"),
    ("memory_bytes", "Memory"),
    ("aux_loss", "Auxiliary loss"),
    ("mtp_loss", "Multi-token prediction loss"),
    ("dropped_fraction", "Dropped tokens"),
    ("val_accuracy", "Validation accuracy"),
)
MAX_OVERLAY_JOBS = 8


@login_required
def job_list(request: HttpRequest) -> HttpResponse:
    latest_loss = MetricPoint.objects.filter(job=OuterRef("pk"), name="loss").order_by("-step").values("value")[:1]
    latest_val = MetricPoint.objects.filter(job=OuterRef("pk"), name="val_loss").order_by("-step").values("value")[:1]
    jobs = list(
        visible_jobs(request.user)
        .select_related("owner", "dataset")
        .annotate(last_loss=Subquery(latest_loss), last_val_loss=Subquery(latest_val))[:LIST_LIMIT]
    )
    rows = [{"job": job, **job_summary(job)} for job in jobs]
    active = sum(1 for job in jobs if job.owner_id == request.user.pk and job.state in ACTIVE_STATES)
    limit = settings.JOBS_MAX_ACTIVE_PER_USER
    return render(request, "jobs/list.html", {"rows": rows, "active": active, "limit": limit})


@login_required
def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_visible_job(request.user, job_id)
    summary = job_summary(job)
    dataset = job.dataset
    # People the job is shared with may not see its owner's dataset: link it only where the link works.
    dataset_visible = dataset is not None and (dataset.is_builtin or dataset.owner_id == request.user.pk)
    return render(
        request,
        "jobs/detail.html",
        {
            "job": job,
            "summary": summary,
            "can_control": can_control(request.user, job),
            "dataset_visible": dataset_visible,
            # What the queue's hardware class trains on: its name does not say (the default class "gpu" is a CPU).
            "queue_class": queue_classes([job.queue])[0],
            "spec_json": json.dumps(job.spec, indent=2),
            "dashboard": {
                "job": summary,
                "ws": f"/ws/jobs/{job.pk}/",
                "api": f"/api/jobs/{job.pk}",
                "can_control": can_control(request.user, job),
                # The routing settings, so that a dead-expert alert says which knob this run has to turn.
                "moe": _moe_settings(job.spec),
            },
            "mtp_depth": _mtp_depth(job.spec),
        },
    )


def _moe_settings(spec: dict[str, Any]) -> dict[str, Any] | None:
    """``model.moe`` of a stored spec with its defaults filled in; None if the spec no longer validates (a spec
    stored by an older schema version the current one refuses: the page still opens, without the advice)."""
    try:
        return load_spec(spec).model.moe.model_dump(mode="json")
    except ValidationError:
        return None


def _mtp_depth(spec: dict[str, Any]) -> int:
    """``model.mtp_depth`` of a stored spec (0 if it no longer validates): the dashboard plots the MTP loss."""
    try:
        return load_spec(spec).model.mtp_depth
    except ValidationError:
        return 0


MAX_PICKER_JOBS = 50


def parse_overlay_ids(raw_ids: list[str]) -> tuple[list[int], str]:
    """The job ids of ``?ids=`` (repeated, or comma-separated as a person types them), first occurrence kept, and
    an error naming the field ("" when none): an id that is not a whole number, or more than ``MAX_OVERLAY_JOBS``."""
    ids: list[int] = []
    for piece in (part for raw in raw_ids for part in raw.split(",")):
        if not piece.strip():
            continue
        job_id = db_int(piece)
        if job_id is None:
            return [], f"ids: {piece.strip()[:40]!r} is not a job id"
        ids.append(job_id)
    ids = list(dict.fromkeys(ids))
    if len(ids) > MAX_OVERLAY_JOBS:
        return ids[:MAX_OVERLAY_JOBS], f"ids: at most {MAX_OVERLAY_JOBS} runs fit on one chart ({len(ids)} chosen)"
    return ids, ""


@login_required
def job_compare(request: HttpRequest) -> HttpResponse:
    """``?ids=1&ids=2[&metric=loss]`` (or ``?ids=1,2``): the same metric of 2 to ``MAX_OVERLAY_JOBS`` runs on one
    chart. No ids: the picker of the user's recent runs. One, or ids that do not parse, answer 400 with the error
    and the picker (``pick=1`` shows the picker beside the chart); a run the user may not see is a 404 that does not say
    which."""
    ids, error = parse_overlay_ids(request.GET.getlist("ids"))
    jobs = {job.pk: job for job in visible_jobs(request.user).filter(pk__in=ids)}
    if len(jobs) != len(ids):
        raise Http404("no such job")  # one of them is not the user's: reveal nothing about which
    ordered = [jobs[i] for i in ids]
    metric = request.GET.get("metric") or "loss"
    known = dict(OVERLAY_METRICS)
    if metric not in known:
        error = error or f"metric: choose one of {', '.join(known)}"
        metric = "loss"
    if 0 < len(ordered) < 2:  # none at all is a first visit: the picker, with nothing to correct yet
        error = error or "ids: select at least two jobs to overlay"
    available = set(MetricPoint.objects.filter(job__in=ordered).values_list("name", flat=True).distinct())
    runs = [
        {
            "id": job.pk,
            "name": job.name,
            "state": job.state,
            "series": history.history(job, names=[metric])["series"].get(metric),
        }
        for job in ordered
    ]
    # Fewer than two runs (or ``pick`` asked for): the page offers the user's recent runs to choose from, those
    # already chosen first and ticked (an older one among them stays choosable).
    picking = len(ordered) < 2 or bool(request.GET.get("pick"))
    recent = visible_jobs(request.user).select_related("owner").order_by("-pk")[:MAX_PICKER_JOBS]
    picker = ordered + [job for job in recent if job.pk not in jobs] if picking else []
    return render(
        request,
        "jobs/compare.html",
        {
            "jobs": ordered,
            "chosen": set(ids),
            "picker": picker,
            "max_jobs": MAX_OVERLAY_JOBS,
            "metric": metric,
            "metric_label": known[metric],
            "metrics": [(name, label) for name, label in OVERLAY_METRICS if name in available or name == metric],
            "all_metrics": OVERLAY_METRICS,
            "runs": runs,
            "overlay": {"metric": metric, "label": known[metric], "runs": runs},
            "error": error,
        },
        status=200 if not error else 400,
    )


@login_required
@require_http_methods(["GET", "POST"])
def job_launch(request: HttpRequest) -> HttpResponse:
    """The launch form: a saved configuration version, a dataset (the built-in corpus by default) and a queue.

    GET shows it (``?config_version=<id>`` preselects one); POST creates the job and redirects to its dashboard,
    or shows the form again with each error next to its field; past the submission rate (shared with the API's),
    429 with ``Retry-After`` and the form as it was.
    """
    if request.method == "POST":
        form = LaunchForm(request.user, request.POST)
        wait = submission_wait(request.user)
        if wait is not None:
            form.add_refusal(Refusal("", retry_message(wait), 429))
            response = render(request, "jobs/launch.html", {"form": form}, status=429)
            response["Retry-After"] = str(wait)
            return response
        if form.is_valid():
            try:
                job = submit_job(request.user, form.submission())
            except Refusal as exc:
                form.add_refusal(exc)
            else:
                audit.record(request, AuditAction.JOB_LAUNCHED, job, queue=job.queue)
                return redirect("jobs:detail", job_id=job.pk)
        status = 400
    else:
        form = LaunchForm(request.user, initial=LaunchForm.initial_for(request.user, request.GET))
        status = 200
    return render(request, "jobs/launch.html", {"form": form}, status=status)
