"""Building test specs (and the dicts they come from) from a base dict with nested overrides."""

from __future__ import annotations

import copy
from typing import Any

from workers.engine.spec import Spec


def merged(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with nested overrides, e.g. ``merged(BASE, training={"plateau": {"patience": 2}})``:
    dicts merge key by key at every depth, anything else replaces. ``base`` is not changed."""

    def merge(into: dict[str, Any], values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    raw = copy.deepcopy(base)
    merge(raw, copy.deepcopy(sections))
    return raw


def merged_spec(base: dict[str, Any], **sections: dict[str, Any]) -> Spec:
    """``merged(base, **sections)`` validated as a spec."""
    return Spec.model_validate(merged(base, **sections))
