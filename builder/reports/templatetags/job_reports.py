"""``{% load job_reports %}``: the reports panel of a job's dashboard."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.inclusion_tag("reports/_job_panel.html", takes_context=True)
def job_reports_panel(context: dict[str, Any], job: Any) -> dict[str, Any]:
    """The reports of ``job`` on its dashboard, and (for its owner) the "Evaluate" button, which
    ``frontend/src/reports.js`` shows once the job has stopped."""
    from builder.jobs.access import can_control
    from builder.reports.models import Report
    from builder.reports.services import EVALUABLE_JOB_STATES

    request = context["request"]
    reports = list(Report.objects.filter(job=job).defer("document", "figures").order_by("-checkpoint_step"))
    return {
        "job": job,
        "reports": reports,
        "can_evaluate": can_control(request.user, job),
        "evaluable": job.state in EVALUABLE_JOB_STATES and job.last_checkpoint_step is not None,
        "evaluated_last": any(r.checkpoint_step == job.last_checkpoint_step for r in reports),
        "csrf_token": context.get("csrf_token"),
    }
