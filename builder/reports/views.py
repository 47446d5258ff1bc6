"""The reports pages: the list, one report, the playground, and the "Evaluate" form of a job's dashboard.

Every page shows only reports of jobs the signed-in user may see (``services.visible_reports``); any other id is
a 404. A report page is rendered from the stored document and figures (nothing is computed on a page view); while
the report is queued or running the page says so and ``frontend/src/reports.js`` reloads it when it finishes.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from builder.core.durable import WorkState
from builder.core.errors import Refusal
from builder.jobs.access import can_control, get_visible_job
from builder.reports import render as formats
from builder.reports.serializers import download_links
from builder.reports.services import get_visible_report, request_report, visible_reports

LIST_LIMIT = 200


@login_required
def report_list(request: HttpRequest) -> HttpResponse:
    reports = list(visible_reports(request.user).select_related("job", "job__owner").defer("figures")[:LIST_LIMIT])
    return render(request, "reports/list.html", {"reports": reports})


@login_required
def report_detail(request: HttpRequest, report_id: int) -> HttpResponse:
    report = get_visible_report(request.user, report_id)
    context = {
        "report": report,
        "job": report.job,
        "downloads": download_links(report),
        "can_control": can_control(request.user, report.job),
        "status_api": f"/api/reports/{report.pk}",
    }
    if report.state == WorkState.SUCCEEDED and report.generated_at is not None:
        context.update(formats.context(report.document, report.figures, report.generated_at, links=True))
    return render(request, "reports/detail.html", context)


@login_required
def playground(request: HttpRequest, report_id: int) -> HttpResponse:
    report = get_visible_report(request.user, report_id)
    task = report.job.spec.get("model", {}).get("task", "causal_lm")
    config = {
        "ws": f"/ws/playground/{report.job_id}/?report={report.pk}",
        "task": task,
        "report": report.pk,
        "job": report.job_id,
    }
    return render(request, "reports/playground.html", {"report": report, "job": report.job, "config": config})


@login_required
@require_POST
def evaluate_job(request: HttpRequest, job_id: int) -> HttpResponse:
    """The dashboard's "Evaluate" button: queue (or find) the report of the job's last checkpoint and open it.

    Only the owner may; a job that cannot be evaluated yet goes back to its dashboard with the reason.
    """
    job = get_visible_job(request.user, job_id)
    if not can_control(request.user, job):
        return render(request, "reports/refused.html", {"job": job, "reason": "Only the job's owner can evaluate it."},
                      status=403)  # fmt: skip
    try:
        outcome = request_report(job, user=request.user)
    except Refusal as exc:
        return render(request, "reports/refused.html", {"job": job, "reason": exc.message}, status=exc.status)
    return redirect("reports:detail", report_id=outcome.report.pk)
