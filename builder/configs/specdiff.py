"""Field-by-field views of specs: flatten to dotted paths, diff two versions, line up several for comparison.

One module serves the version diff and the comparison page, so both agree on what "a field" is: a leaf of the
spec's JSON (a list such as ``betas`` is one field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"moe": {"top_k": 2}}}`` → ``{"model.moe.top_k": 2}``, in the spec's field order."""
    out: dict[str, Any] = {}
    for key, value in spec.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


@dataclass(frozen=True)
class FieldChange:
    path: str
    before: Any
    after: Any


def diff_specs(before: dict[str, Any], after: dict[str, Any]) -> list[FieldChange]:
    """Fields whose values differ (a field missing on one side shows as None there), in field order."""
    a, b = flatten(before), flatten(after)
    paths = list(a) + [p for p in b if p not in a]
    return [FieldChange(p, a.get(p), b.get(p)) for p in paths if a.get(p) != b.get(p)]


@dataclass(frozen=True)
class FieldRow:
    path: str
    values: list[Any]
    differs: bool


def align(specs: list[dict[str, Any]]) -> list[FieldRow]:
    """One row per field across ``specs`` (missing: None), ``differs`` when the values are not all equal."""
    flats = [flatten(s) for s in specs]
    paths: list[str] = []
    for flat in flats:
        paths.extend(p for p in flat if p not in paths)
    rows = []
    for path in paths:
        values = [flat.get(path) for flat in flats]
        rows.append(FieldRow(path, values, any(v != values[0] for v in values[1:])))
    return rows
