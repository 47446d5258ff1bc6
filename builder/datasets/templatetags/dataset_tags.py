"""Number formatting for the dataset pages (Django's humanize is not installed for two filters)."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.filter
def thousands(value: Any) -> str:
    """12345678 → "12,345,678"; anything that is not a number is shown as it is."""
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return str(value)


@register.filter
def percent(value: Any, digits: int = 1) -> str:
    """0.0388 → "3.9%"."""
    try:
        return f"{float(value) * 100:.{int(digits)}f}%"
    except (TypeError, ValueError):
        return str(value)


@register.filter
def spaced(value: Any) -> str:
    """ "exact_duplicate" → "exact duplicate"."""
    return str(value).replace("_", " ")
