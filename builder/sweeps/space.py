"""The search space of a sweep: which spec fields a trial varies, over which range or choices.

A space is a list of parameters, each naming a spec field by its dotted path (the paths of ``workers.engine.spec``'s
errors)::

    [{"path": "training.optimizer.lr", "kind": "float", "low": 1e-4, "high": 3e-3, "log": true},
     {"path": "model.moe.num_routed_experts", "kind": "choice", "choices": [4, 8, 16]},
     {"path": "model.moe.top_k", "kind": "int", "low": 1, "high": 2}]

``parse_space`` checks each path against the base spec (it must name a value of the spec, not a section) and each
bound and choice against the spec's own rules for that field, so that a range the field cannot take is refused at
once, naming the parameter (``space.0.high``) and the spec's reason. Combinations are not checked here: a trial whose
values break a cross-field rule (``top_k`` above ``num_routed_experts``) is recorded as failed with that reason.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from builder.core.errors import Refusal
from workers.engine.spec import load_spec, spec_errors

MAX_PARAMETERS = 20
MAX_CHOICES = 50
KINDS = ("float", "int", "choice")
# Set from the dataset when a job is submitted (builder.jobs.submit.resolve_spec): varying them would do nothing.
FROM_THE_DATASET = frozenset({"data.text_field", "data.label_field"})
Scalar = bool | int | float | str | None
# Refusals answer 422 (the request matches its published schema but the spec cannot take it), or 400 when one of
# the problems is with the shape the schema publishes (a kind that is not float, int or choice; a bound that is not a
# number), which the API's schema states.
UNFIT = 422


class Malformed(tuple[str, str]):
    """A problem with the published shape of the space (answered 400, not 422)."""


def _malformed(path: str, message: str) -> Malformed:
    return Malformed((path, message))


def refusal(problems: list[tuple[str, str]]) -> Refusal:
    return Refusal.of(problems, 400 if any(isinstance(p, Malformed) for p in problems) else UNFIT)


@dataclass(frozen=True)
class Parameter:
    """One dimension of the space: a float or int range (``log``: sampled on a log scale), or a set of choices."""

    path: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | None = None
    choices: tuple[Scalar, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"path": self.path, "kind": self.kind, "choices": list(self.choices)}
        out: dict[str, Any] = {"path": self.path, "kind": self.kind, "low": self.low, "high": self.high}
        out["log"] = self.log
        if self.kind == "int":
            out["step"] = self.step or 1
        return out

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take."""
        if self.kind == "choice":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if self.kind == "int":
            step = self.step or 1
            return _is_int(value) and self.low <= value <= self.high and (value - int(self.low or 0)) % step == 0
        return _is_number(value) and float(self.low or 0) <= value <= float(self.high or 0)

    def distribution(self) -> Any:
        """Optuna's distribution of this parameter."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low or 0), int(self.high or 0), log=self.log, step=self.step or 1)
        return FloatDistribution(float(self.low or 0.0), float(self.high or 0.0), log=self.log)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def lookup(spec: dict[str, Any], path: str) -> Any:
    """The value at dotted ``path`` of ``spec``; ``KeyError`` naming the first missing part."""
    node: Any = spec
    walked: list[str] = []
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(walked) or "the spec"
            raise KeyError(f"{where} has no field {part!r}")
        node = node[part]
        walked.append(part)
    return node


def apply(spec: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` with each dotted path of ``params`` set to its value (the paths were checked to exist)."""
    out = copy.deepcopy(spec)
    for path, value in params.items():
        *sections, leaf = path.split(".")
        node = out
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def field_problems(base: dict[str, Any], path: str, value: Any) -> list[str]:
    """What the spec says about ``value`` at ``path`` alone (bounds, type), ignoring rules across fields, which
    depend on the other values a trial draws."""
    try:
        load_spec(apply(base, {path: value}))
    except ValidationError as exc:
        # Pydantic runs the cross-field rules only once every field is valid: an error of that kind means the
        # value itself is fine.
        if any(err["type"] == "cross_field" for err in exc.errors()):
            return []
        return [f"{e['path']}: {e['message']}" for e in spec_errors(exc)]
    return []


def parse_space(raw: Any, base: dict[str, Any]) -> list[Parameter]:
    """Check ``raw`` against the (complete, valid) ``base`` spec; a ``Refusal`` names every problem
    (``space.<i>.<key>``)."""
    if not isinstance(raw, list):
        raise Refusal("space", "give the search space as a list of parameters")
    if not raw or len(raw) > MAX_PARAMETERS:
        raise Refusal("space", f"give the search space as a list of 1 to {MAX_PARAMETERS} parameters", UNFIT)
    problems: list[tuple[str, str]] = []
    params: list[Parameter] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        at = f"space.{i}"
        if not isinstance(item, dict):
            problems.append(_malformed(at, "each parameter is an object with path and kind"))
            continue
        unknown = sorted(set(item) - {"path", "kind", "low", "high", "log", "step", "choices"})
        if unknown:
            problems.append((f"{at}.{unknown[0]}", "unknown key; use path, kind, low, high, log, step, choices"))
            continue
        found = _parse_parameter(item, base, at, seen)
        if isinstance(found, Parameter):
            params.append(found)
            seen.add(found.path)
        else:
            problems.extend(found)
    if problems:
        raise refusal(problems)
    return params


def _parse_parameter(
    item: dict[str, Any], base: dict[str, Any], at: str, seen: set[str]
) -> Parameter | list[tuple[str, str]]:
    path, kind = item.get("path"), item.get("kind")
    if not isinstance(path, str) or not path:
        return [_malformed(f"{at}.path", "give the dotted path of a spec field, e.g. training.optimizer.lr")]
    if path in seen:
        return [(f"{at}.path", f"{path} appears twice in the space")]
    if path in FROM_THE_DATASET:
        return [(f"{at}.path", f"{path} is set from the dataset at launch; it cannot be searched")]
    try:
        current = lookup(base, path)
    except KeyError as exc:
        return [(f"{at}.path", f"{path}: {exc.args[0]}")]
    if isinstance(current, dict | list):
        return [(f"{at}.path", f"{path} is a section of the spec, not one value; name a field inside it")]
    if kind not in KINDS:
        return [_malformed(f"{at}.kind", "kind must be float, int or choice")]
    if kind == "choice":
        return _parse_choices(item, base, at, path)
    if kind == "float" and _is_int(current):
        # The base spec is complete and dumped from the schema: an integer there is an integer field.
        return [(f"{at}.kind", f"{path} is an integer field: use kind int or choice")]
    return _parse_range(item, base, at, path, kind)


def _parse_choices(item: dict[str, Any], base: dict[str, Any], at: str, path: str) -> Parameter | list[tuple[str, str]]:
    choices = item.get("choices")
    if not isinstance(choices, list):
        return [_malformed(f"{at}.choices", f"give a list of 1 to {MAX_CHOICES} values")]
    if not 1 <= len(choices) <= MAX_CHOICES:
        return [(f"{at}.choices", f"give a list of 1 to {MAX_CHOICES} values")]
    problems = []
    for j, value in enumerate(choices):
        if not (value is None or isinstance(value, bool | str) or _is_number(value)):
            problems.append((f"{at}.choices.{j}", "a choice is a number, a string, true, false or null"))
        elif value in choices[:j] and any(type(value) is type(c) for c in choices[:j] if c == value):
            problems.append((f"{at}.choices.{j}", f"{value!r} is listed twice"))
        else:
            problems.extend((f"{at}.choices.{j}", p) for p in field_problems(base, path, value))
    if any(k in item for k in ("low", "high", "log", "step")):
        problems.append(
            (f"{at}.kind", "a choice parameter takes choices only (low, high, log and step are for ranges)")
        )
    return problems or Parameter(path=path, kind="choice", choices=tuple(choices))


def _parse_range(
    item: dict[str, Any], base: dict[str, Any], at: str, path: str, kind: str
) -> Parameter | list[tuple[str, str]]:
    low: Any = item.get("low")
    high: Any = item.get("high")
    log, step = item.get("log", False), item.get("step")
    problems: list[tuple[str, str]] = []
    for key, value in (("low", low), ("high", high)):
        if not _is_number(value):  # the published shape: a number
            problems.append(_malformed(f"{at}.{key}", f"{key} must be {'an integer' if kind == 'int' else 'a number'}"))
        elif kind == "int" and not _is_int(value):
            problems.append((f"{at}.{key}", f"{key} must be an integer"))
    if not isinstance(log, bool):
        problems.append(_malformed(f"{at}.log", "log must be true or false"))
    if "choices" in item:
        problems.append((f"{at}.choices", "choices are for kind choice"))
    if kind == "float" and step is not None:
        problems.append((f"{at}.step", "step is for kind int"))
    if kind == "int" and step is not None and (not _is_int(step) or step < 1):
        problems.append(_malformed(f"{at}.step", "step must be a positive integer"))
    if problems:
        return problems
    if kind == "float":
        low, high = float(low), float(high)
    if not low < high:
        return [(f"{at}.high", f"high ({high}) must be above low ({low})")]
    if log and low <= 0:
        return [(f"{at}.low", "a log scale needs low above 0")]
    if kind == "int" and log and step not in (None, 1):
        return [(f"{at}.step", "a log scale takes no step")]
    for key, value in (("low", low), ("high", high)):
        problems.extend((f"{at}.{key}", p) for p in field_problems(base, path, value))
    if problems:
        return problems
    return Parameter(path=path, kind=kind, low=low, high=high, log=bool(log), step=step if kind == "int" else None)


def parameters_of(stored: list[dict[str, Any]]) -> list[Parameter]:
    """The parameters of a space as stored (already checked by ``parse_space``)."""
    out = []
    for item in stored:
        choices = tuple(item.get("choices") or ())
        out.append(
            Parameter(
                path=item["path"],
                kind=item["kind"],
                low=item.get("low"),
                high=item.get("high"),
                log=bool(item.get("log", False)),
                step=item.get("step"),
                choices=choices,
            )
        )
    return out


def parse_first_trials(raw: Any, params: list[Parameter]) -> list[dict[str, Any]]:
    """Parameter sets to try before the sampler's (``{path: value}`` with every path of the space, each value in its
    range or choices); a ``Refusal`` names ``first_trials.<i>.<path>``."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise Refusal("first_trials", "give a list of at most 20 parameter sets ({path: value})")
    if len(raw) > 20:
        raise Refusal("first_trials", "give a list of at most 20 parameter sets ({path: value})", UNFIT)
    by_path = {p.path: p for p in params}
    problems: list[tuple[str, str]] = []
    for i, values in enumerate(raw):
        at = f"first_trials.{i}"
        if not isinstance(values, dict):
            problems.append(_malformed(at, "each is an object {path: value} over the space's paths"))
            continue
        for path in sorted(set(values) - set(by_path)):
            problems.append((f"{at}.{path}", "not a path of the space"))
        for path in sorted(set(by_path) - set(values)):
            problems.append((f"{at}.{path}", "missing: give a value for every path of the space"))
        for path, value in values.items():
            param = by_path.get(path)
            if param is not None and not param.contains(value):
                problems.append((f"{at}.{path}", f"{value!r} is outside the space ({_describe(param)})"))
    if problems:
        raise refusal(problems)
    return [dict(values) for values in raw]


def _describe(param: Parameter) -> str:
    if param.kind == "choice":
        return "one of " + ", ".join(repr(c) for c in param.choices)
    return f"{param.low} to {param.high}" + (" (log scale)" if param.log else "")
