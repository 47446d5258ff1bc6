"""``{% load formatting %}``: the filters every page formats figures with (``builder.core.formatting``).

{{ bytes|human_bytes }}  {{ n|human_count }}  {{ flops|human_flops }}
{{ seconds|duration }}  {{ seconds|approx_duration }}  {{ fraction|percent }}  {{ fraction|percent:0 }}
{{ value|share:total }}  {{ x|num }}  {{ x|fixed:3 }}  {{ n|thousands }}  {{ code|spaced }}
{{ value|json_value }}  {{ figure|svg }}  {{ mapping|get:key }}
"""

from __future__ import annotations

from typing import Any

from django import template
from django.utils.safestring import SafeString, mark_safe

from builder.core import formatting

register = template.Library()

register.filter("human_bytes", formatting.human_bytes)
register.filter("human_count", formatting.human_count)
register.filter("human_flops", formatting.human_flops)
register.filter("duration", formatting.duration)
register.filter("approx_duration", formatting.approx_duration)
register.filter("percent", formatting.percent)
register.filter("share", formatting.share)
register.filter("num", formatting.num)
register.filter("fixed", formatting.fixed)
register.filter("thousands", formatting.thousands)
register.filter("spaced", formatting.spaced)
register.filter("json_value", formatting.json_value)
register.filter("get", formatting.lookup)


@register.filter
def svg(value: Any) -> SafeString:
    """A figure's SVG inline. Safe: the SVG is drawn by matplotlib on the worker from numbers and labels that it
    escapes itself (``builder/reports/figures.py``), never taken from a request."""
    return mark_safe(str(value or ""))
