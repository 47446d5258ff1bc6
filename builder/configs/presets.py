"""Named templates, kept as data: one JSON file per template in ``presets/``.

Each file holds ``title``, ``description`` (what it is, in a sentence or three), optionally ``why`` (the
measurements behind its settings, shown on demand), ``task`` (``generation`` or ``classification``), the hardware it
is sized for (``hardware`` profile key and ``num_gpus``), the built-in dataset it suits (``dataset`` slug or
null) and a ``spec`` (partial: defaults fill the rest). The file name is the template's name. Every template
is validated when this module is imported: a broken template stops start-up instead of reaching a user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.engine.estimate import count_parameters
from workers.engine.hardware import PROFILES
from workers.engine.spec import Spec, load_spec

PRESET_DIR = Path(__file__).resolve().parent / "presets"


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    description: str
    task: str
    hardware: str
    num_gpus: int
    dataset: str | None
    spec: Spec
    why: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "why": self.why,
            "task": self.task,
            "hardware": self.hardware,
            "num_gpus": self.num_gpus,
            "dataset": self.dataset,
            "spec": self.spec.model_dump(mode="json"),
        }


def _load(path: Path) -> Preset:
    raw = json.loads(path.read_text())
    hardware = raw["hardware"]
    if hardware not in PROFILES:
        raise ValueError(f"{path.name}: unknown hardware {hardware!r}")
    if raw["task"] not in ("generation", "classification"):
        raise ValueError(f"{path.name}: task must be generation or classification")
    return Preset(
        name=path.stem,
        title=raw["title"],
        description=raw["description"],
        task=raw["task"],
        hardware=hardware,
        num_gpus=int(raw["num_gpus"]),
        dataset=raw.get("dataset"),
        spec=load_spec(raw["spec"]),
        why=raw.get("why", ""),
    )


def _load_all() -> dict[str, Preset]:
    presets = [_load(p) for p in sorted(PRESET_DIR.glob("*.json"))]
    # Smallest first: the order people meet them in, from the CPU demo up.
    presets.sort(key=lambda p: count_parameters(p.spec))
    return {p.name: p for p in presets}


PRESETS: dict[str, Preset] = _load_all()
