"""Figures for people: bytes, counts, FLOPs, durations, percentages. Plain functions, used by the templates
(``{% load formatting %}``, ``builder/core/templatetags/formatting.py``) and by Python code that writes text
(the report's Markdown and PDF tables).

Every function takes anything and never fails: a missing, non-numeric or non-finite value shows as ``DASH``.
The same text in every locale (unlike Django's ``filesizeformat`` and ``intcomma``).
"""

from __future__ import annotations

import json
import math
from typing import Any

DASH = "—"


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None (None, booleans, text that is not a number, NaN, infinities)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def human_bytes(value: Any) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.2 GiB``, up to TiB."""
    n = number(value)
    if n is None:
        return DASH
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(value: Any) -> str:
    """A count with a suffix: ``950``, ``12.3k``, ``12.3M``, ``1.9B``, ``2.0T``."""
    n = number(value)
    if n is None:
        return DASH
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            return f"{n / limit:.1f}{suffix}"
    return f"{n:.0f}"


def human_flops(value: Any) -> str:
    """FLOPs with SI prefixes: ``48.8 MFLOP``, ``3.1 PFLOP``."""
    n = number(value)
    if n is None:
        return DASH
    for limit, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            return f"{n / limit:.1f} {prefix}FLOP"
    return f"{n:.0f} FLOP"


def duration(seconds: Any, sub_minute_decimals: int = 0) -> str:
    """Elapsed time the way a clock reads: ``42 s``, ``4 min 10 s``, ``2 h 05 min``.

    Under a minute, ``sub_minute_decimals`` digits after the point (``42.3 s`` with 1); above, whole seconds.
    """
    s = number(seconds)
    if s is None:
        return DASH
    if sub_minute_decimals and s < 60:
        return f"{s:.{int(sub_minute_decimals)}f} s"
    hours, rest = divmod(round(s), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def approx_duration(seconds: Any) -> str:
    """A predicted time at the scale that reads best: ``850 ms``, ``42.0 s``, ``12 min``, ``3.4 h``, ``2.1 days``."""
    s = number(seconds)
    if s is None:
        return DASH
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def percent(fraction: Any, decimals: int = 1) -> str:
    """A fraction as a percentage: ``0.4567`` → ``45.7%`` (``46%`` with 0 decimals)."""
    n = number(fraction)
    return DASH if n is None else f"{100 * n:.{int(decimals)}f}%"


def share(value: Any, total: Any) -> str:
    """``value`` as a percentage of ``total`` for a CSS width: 0–100 with two decimals, ``0`` when undefined."""
    v, t = number(value), number(total)
    if v is None or t is None or t <= 0:
        return "0"
    return f"{max(0.0, min(100.0, 100 * v / t)):.2f}"


def num(value: Any, digits: int = 4) -> str:
    """Significant digits for people: ``2.3456`` (4), ``0.000123`` as ``1.23e-04``, ``123456`` as ``123,456``."""
    n = number(value)
    if n is None:
        return DASH
    if n == 0:
        return "0"
    if n.is_integer() and abs(n) < 1e15:
        return f"{int(n):,}"
    if abs(n) < 1e-3 or abs(n) >= 1e7:
        return f"{n:.{max(int(digits) - 1, 0)}e}"
    return f"{n:.{int(digits)}g}"


def fixed(value: Any, decimals: int = 2) -> str:
    """``decimals`` digits after the point: ``0.123`` → ``0.12``."""
    n = number(value)
    return DASH if n is None else f"{n:.{int(decimals)}f}"


def thousands(value: Any) -> str:
    """An integer with thousands separators: ``12345678`` → ``12,345,678``; anything else shown as it is."""
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return str(value)


def spaced(value: Any) -> str:
    """A code as words: ``exact_duplicate`` → ``exact duplicate``."""
    return str(value).replace("_", " ")


def json_value(value: Any) -> str:
    """A value as the JSON editor shows it: ``null``, ``true``, ``[0.9, 0.95]``."""
    return json.dumps(value)


def lookup(mapping: Any, key: Any) -> Any:
    """``mapping[key]`` (a dict, a list, a form's field), or None when there is none."""
    try:
        return mapping[key]
    except (KeyError, IndexError, TypeError):
        return None
