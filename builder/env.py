"""Typed environment helpers for settings: each fails loudly, naming the variable, on a bad value.

A missing variable yields the default; a present but malformed one raises ``ImproperlyConfigured`` instead of
silently falling back, so a typo in production never turns into a quiet misconfiguration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _raw(name: str, environ: Mapping[str, str] | None) -> str | None:
    value = (os.environ if environ is None else environ).get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def env_str(name: str, default: str = "", environ: Mapping[str, str] | None = None) -> str:
    """The variable's value, or ``default`` when unset or blank."""
    value = _raw(name, environ)
    return default if value is None else value


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); anything else is an error."""
    value = _raw(name, environ)
    if value is None:
        return default
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use one of true/false, 1/0, yes/no, on/off)")


def env_int(
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """An integer within ``[minimum, maximum]`` (bounds optional)."""
    value = _raw(name, environ)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name}={number} is above the maximum {maximum}")
    return number


def env_list(name: str, default: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """A comma-separated list; empty items are an error (they are almost always a typo)."""
    value = _raw(name, environ)
    if value is None:
        return list(default)
    items = [item.strip() for item in value.split(",")]
    if any(not item for item in items):
        raise ImproperlyConfigured(f"{name}={value!r} has an empty item")
    return items


def env_pairs(name: str, default: dict[str, str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Comma-separated ``key=value`` pairs (``gpu.t4=t4,cpu=cpu``) as a dict in the order given; an item without
    ``=``, an empty key or value, or a key given twice is an error."""
    value = _raw(name, environ)
    if value is None:
        return dict(default)
    pairs: dict[str, str] = {}
    for item in env_list(name, [], environ):
        key, sep, val = (part.strip() for part in item.partition("="))
        if not sep or not key or not val:
            raise ImproperlyConfigured(f"{name}: {item!r} is not key=value")
        if key in pairs:
            raise ImproperlyConfigured(f"{name}: {key!r} is given twice")
        pairs[key] = val
    return pairs


def env_choice(name: str, default: str, choices: tuple[str, ...], environ: Mapping[str, str] | None = None) -> str:
    """One of ``choices`` (case-sensitive)."""
    value = _raw(name, environ)
    if value is None:
        return default
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def env_url(name: str, default: str, schemes: tuple[str, ...], environ: Mapping[str, str] | None = None) -> str:
    """A URL whose scheme is one of ``schemes`` (e.g. ``redis``/``rediss``)."""
    value = env_str(name, default, environ)
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in schemes or not rest:
        raise ImproperlyConfigured(f"{name}={value!r} is not a URL with scheme {' or '.join(schemes)}")
    return value


# The periods of a rate, by the words DRF's throttles accept ("10/min", "100/hour", "5/s").
RATE_PERIODS = {
    **dict.fromkeys(("s", "sec", "second"), 1),
    **dict.fromkeys(("m", "min", "minute"), 60),
    **dict.fromkeys(("h", "hour"), 3600),
    **dict.fromkeys(("d", "day"), 86400),
}


def env_rate(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    """A rate ``"<count>/<period>"`` (period s/sec/second, m/min/minute, h/hour, d/day; count ≥ 1), as DRF's
    throttles write it."""
    value = env_str(name, default, environ)
    count, sep, period = value.partition("/")
    if not sep or not count.strip().isdigit() or int(count) < 1 or period.strip() not in RATE_PERIODS:
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a rate like 10/min (a count of at least 1, then s, min, hour or day)"
        )
    return f"{int(count)}/{period.strip()}"
