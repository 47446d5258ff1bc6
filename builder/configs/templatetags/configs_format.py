"""Human-readable figures for the configure pages: bytes, counts, FLOPs, durations, bar widths."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.filter
def bytes_h(value: Any) -> str:
    """Bytes in binary units: ``1.5 GiB``."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@register.filter
def count_h(value: Any) -> str:
    """A count with a suffix: ``12.3M``, ``1.9B``."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        return "–"
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            return f"{n / limit:.1f}{suffix}"
    return f"{n:.0f}"


@register.filter
def flops_h(value: Any) -> str:
    """FLOPs with SI prefixes: ``48.8 MFLOP``."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        return "–"
    for limit, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            return f"{n / limit:.1f} {prefix}FLOP"
    return f"{n:.0f} FLOP"


@register.filter
def duration_h(value: Any) -> str:
    """Seconds as ``850 ms``, ``42 s``, ``12 min``, ``3.4 h``, ``2.1 days``."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        return "–"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


@register.filter
def share(value: Any, total: Any) -> str:
    """``value`` as a percentage of ``total`` for a CSS width, 0–100 with two decimals."""
    try:
        v, t = float(value), float(total)
    except (TypeError, ValueError):
        return "0"
    if t <= 0:
        return "0"
    return f"{max(0.0, min(100.0, 100 * v / t)):.2f}"


@register.filter
def percent(value: Any) -> str:
    try:
        return f"{100 * float(value):.0f}%"
    except (TypeError, ValueError):
        return "–"


@register.filter
def json_value(value: Any) -> str:
    """A spec value as the JSON editor would show it (null, true, [0.9, 0.95])."""
    import json

    return json.dumps(value)


@register.filter
def get_item(mapping: Any, key: Any) -> Any:
    try:
        return mapping[key]
    except (KeyError, IndexError, TypeError):
        return None
