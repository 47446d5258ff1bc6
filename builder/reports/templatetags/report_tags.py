"""Template filters of the report pages (and of the PDF, which renders the same templates).

They format for people and never fail: a missing or non-finite number shows as "—".
"""

from __future__ import annotations

import json
import math
from typing import Any

from django import template
from django.utils.safestring import SafeString, mark_safe

register = template.Library()

DASH = "—"


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@register.filter
def num(value: Any, digits: int = 4) -> str:
    """Significant digits for people: ``2.3456`` (4), ``0.000123`` as ``1.23e-04``, ``123456`` as ``123,456``."""
    number = _number(value)
    if number is None:
        return DASH
    if number == 0:
        return "0"
    if number.is_integer() and abs(number) < 1e15:
        return f"{int(number):,}"
    if abs(number) < 1e-3 or abs(number) >= 1e7:
        return f"{number:.{max(int(digits) - 1, 0)}e}"
    return f"{number:.{int(digits)}g}"


@register.filter
def fixed(value: Any, decimals: int = 2) -> str:
    number = _number(value)
    return DASH if number is None else f"{number:.{int(decimals)}f}"


@register.filter
def pct(value: Any, decimals: int = 1) -> str:
    """A fraction as a percentage: ``0.4567`` → ``45.7%``."""
    number = _number(value)
    return DASH if number is None else f"{100 * number:.{int(decimals)}f}%"


@register.filter
def size(value: Any) -> str:
    """Bytes in binary units: ``1536`` → ``1.5 KiB`` (the same text in every locale, unlike filesizeformat)."""
    number = _number(value)
    if number is None:
        return DASH
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(number) < 1024 or unit == "GiB":
            return f"{int(number)} B" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return DASH  # unreachable: GiB returns


@register.filter
def seconds(value: Any) -> str:
    number = _number(value)
    if number is None:
        return DASH
    if number < 60:
        return f"{number:.1f} s"
    minutes, secs = divmod(round(number), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


@register.filter
def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


@register.filter
def svg(value: Any) -> SafeString:
    """A figure's SVG inline. Safe: the SVG is drawn by matplotlib on the worker from numbers and labels that it
    escapes itself (``figures.py``), never taken from a request."""
    return mark_safe(str(value or ""))


@register.filter
def get(mapping: Any, key: Any) -> Any:
    """``mapping[key]`` in a template (None when absent)."""
    try:
        return mapping[key]
    except (KeyError, IndexError, TypeError):
        return None


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
