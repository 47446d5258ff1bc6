"""Tests of the configuration schema (workers/engine/spec.py).

Per-field bounds and Literal choices are discovered by introspecting the pydantic models, so a field added
later is covered without touching this file (a bound that interacts with a cross-field rule needs an entry in
``BOUND_FIXUPS``; the test says so when it is missing). Every error is checked by the dotted path that
``spec_errors`` returns, because that path is what the API and the editor show next to the field.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types as at
import pytest
from pydantic import BaseModel, ValidationError

from workers.engine import spec as spec_mod
from workers.engine.spec import (
    MIGRATIONS,
    SPEC_VERSION,
    Spec,
    cross_field_problems,
    json_schema,
    load_spec,
    migrate,
    spec_errors,
)

# ----------------------------------------------------------------------------------------------------
# helpers


def _set(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set a dotted path in a nested dict, creating the intermediate dicts."""
    *parents, leaf = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return raw


def _raw(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A raw spec dict (defaults everywhere) with dotted-path overrides applied."""
    raw: dict[str, Any] = {}
    for path, value in (overrides or {}).items():
        _set(raw, path, value)
    return raw


def _error_paths(raw: dict[str, Any]) -> list[str]:
    """The dotted paths of every error for ``raw``; [] if it validates."""
    try:
        Spec.model_validate(raw)
    except ValidationError as exc:
        errors = spec_errors(exc)
        assert errors, "a ValidationError must flatten to at least one error"
        for err in errors:
            assert set(err) == {"path", "message"}
            assert isinstance(err["message"], str) and err["message"].strip()
        return [err["path"] for err in errors]
    return []


def _assert_valid(raw: dict[str, Any]) -> Spec:
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:  # pragma: no cover - failure reporting only
        pytest.fail(f"expected {raw!r} to validate, got {spec_errors(exc)!r}")


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _variants(annotation: Any) -> list[type[BaseModel]]:
    """The models of a field: one, or each member of a (tagged) union of models."""
    ann = _unwrap_optional(annotation)
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(ann) for m in _variants(a)]
    return [ann] if isinstance(ann, type) and issubclass(ann, BaseModel) else []


@dataclass(frozen=True)
class Section:
    """One object of the spec: ``path`` (dotted, "" at the top), its model, and the ``fixup`` (dotted path ->
    value) that selects it when it is a non-default member of a union (``training.optimizer`` with
    ``name: muon``). ``key`` names it uniquely: ``training.optimizer[muon]``."""

    key: str
    path: str
    model: type[BaseModel]
    fixup: tuple[tuple[str, Any], ...] = ()


def _sections(
    model: type[BaseModel] = Spec, prefix: str = "", fixup: tuple[tuple[str, Any], ...] = ()
) -> dict[str, Section]:
    """Every section of the spec by key ("" is the top level); each member of a union is a section."""
    out = {prefix: Section(prefix, prefix.split("[")[0], model, fixup)}
    for name, info in model.model_fields.items():
        path = f"{out[prefix].path}.{name}" if prefix else name
        variants = _variants(info.annotation)
        for variant in variants:
            if len(variants) == 1:
                out.update(_sections(variant, path, fixup))
                continue
            tag = variant.model_fields["name"].default
            if isinstance(tag, str):  # the default member: chosen when name is left out
                out.update(_sections(variant, path, fixup))
            else:
                (tag,) = typing.get_args(variant.model_fields["name"].annotation)
                out.update(_sections(variant, f"{path}[{tag}]", (*fixup, (f"{path}.name", tag))))
    return out


SECTIONS = _sections()


@dataclass(frozen=True)
class FieldCase:
    path: str  # dotted, as a spec writes it
    key: str  # unique: the section key and the field name
    info: Any  # pydantic FieldInfo
    fixup: tuple[tuple[str, Any], ...]


def _fields() -> list[FieldCase]:
    """Every field of every section."""
    out = []
    for section in SECTIONS.values():
        for name, info in section.model.model_fields.items():
            path = f"{section.path}.{name}" if section.path else name
            key = f"{section.key}.{name}" if section.key else name
            out.append(FieldCase(path, key, info, section.fixup))
    return out


FIELDS = _fields()


# ----------------------------------------------------------------------------------------------------
# sections and descriptions


def test_sections_are_the_expected_ones() -> None:
    assert set(SECTIONS) == {
        "",
        "model",
        "model.mla",
        "model.moe",
        "training",
        "training.optimizer",
        "training.optimizer[adafactor]",
        "training.optimizer[sgd]",
        "training.optimizer[muon]",
        "training.schedule",
        "training.plateau",
        "training.anomaly",
        "training.distributed",
        "data",
    }


@pytest.mark.parametrize("field", FIELDS, ids=[f.key for f in FIELDS])
def test_every_field_has_a_description(field: FieldCase) -> None:
    assert isinstance(field.info.description, str) and field.info.description.strip(), f"{field.key}: no description"


# ----------------------------------------------------------------------------------------------------
# per-field bounds, derived from the fields' annotated_types metadata


@dataclass(frozen=True)
class BoundCase:
    path: str
    constraint: str  # e.g. "ge=1"
    side: Literal["min", "max"]
    bad: Any  # just outside the bound
    good: Any  # at the bound (ge/le/min_length/max_length) or just inside it (gt/lt)
    key: str = ""  # the field's unique key (differs from path in a union member)
    fixup: tuple[tuple[str, Any], ...] = ()  # selects the union member

    @property
    def id(self) -> str:
        return f"{self.key or self.path}:{self.constraint}"


def _bound_cases() -> list[BoundCase]:
    cases: list[BoundCase] = []
    for field in FIELDS:
        path, info = field.path, field.info
        base = _unwrap_optional(info.annotation)
        extra: dict[str, Any] = {"key": field.key, "fixup": field.fixup}
        for meta in info.metadata:
            if isinstance(meta, at.MinLen):
                n = meta.min_length
                cases.append(BoundCase(path, f"min_length={n}", "min", "x" * (n - 1), "x" * n, **extra))
                continue
            if isinstance(meta, at.MaxLen):
                n = meta.max_length
                cases.append(BoundCase(path, f"max_length={n}", "max", "x" * (n + 1), "x" * n, **extra))
                continue
            if not isinstance(meta, at.Ge | at.Gt | at.Le | at.Lt):
                continue
            is_int = base is int
            assert is_int or base is float, f"{path}: numeric bound on unexpected type {base!r}"

            def below(x: Any, is_int: bool = is_int) -> Any:
                return x - 1 if is_int else math.nextafter(float(x), -math.inf)

            def above(x: Any, is_int: bool = is_int) -> Any:
                return x + 1 if is_int else math.nextafter(float(x), math.inf)

            def num(x: Any, is_int: bool = is_int) -> Any:
                return x if is_int else float(x)

            if isinstance(meta, at.Ge):
                cases.append(BoundCase(path, f"ge={meta.ge}", "min", below(meta.ge), num(meta.ge), **extra))
            elif isinstance(meta, at.Gt):
                cases.append(BoundCase(path, f"gt={meta.gt}", "min", num(meta.gt), above(meta.gt), **extra))
            elif isinstance(meta, at.Le):
                cases.append(BoundCase(path, f"le={meta.le}", "max", above(meta.le), num(meta.le), **extra))
            else:
                cases.append(BoundCase(path, f"lt={meta.lt}", "max", num(meta.lt), below(meta.lt), **extra))
    return cases


BOUND_CASES = _bound_cases()

# A value at a bound can break a cross-field rule with the other fields at their defaults; these overrides
# keep the rest of the spec consistent so that the bound value alone is under test. Keyed by (path, side),
# or by path for both sides.
BOUND_FIXUPS: dict[tuple[str, str] | str, dict[str, Any]] = {
    "model.num_labels": {"model.task": "classification"},
    ("model.num_heads", "max"): {"model.hidden_size": 512},  # 256 heads of 256 would be odd head_dim 1
    ("model.num_kv_heads", "max"): {"model.num_heads": 256, "model.hidden_size": 512},
    ("model.max_seq_len", "min"): {"data.seq_len": 8},
    ("model.moe.num_routed_experts", "min"): {"model.moe.top_k": 1},
    ("model.moe.top_k", "max"): {"model.moe.num_routed_experts": 32},
    ("model.moe.first_dense_layers", "max"): {"model.num_layers": 256},
    ("model.moe.n_group", "max"): {"model.moe.num_routed_experts": 512, "model.moe.top_k": 1},
    ("model.moe.topk_group", "max"): {"model.moe.n_group": 512, "model.moe.num_routed_experts": 512},
    ("training.max_steps", "min"): {"training.schedule.warmup_steps": 0},
    ("training.schedule.warmup_steps", "max"): {"training.max_steps": 10_000_000},
    ("data.seq_len", "max"): {"model.max_seq_len": 131072},
    ("data.bpe_vocab_size", "max"): {"model.vocab_size": 262144},
    ("training.distributed.devices", "max"): {"training.batch_size": 1024},  # devices divide the batch
}


def _bound_raw(case: BoundCase, value: Any) -> dict[str, Any]:
    overrides = {**dict(case.fixup), **BOUND_FIXUPS.get(case.path, {}), **BOUND_FIXUPS.get((case.path, case.side), {})}
    overrides[case.path] = value
    return _raw(overrides)


def test_bounded_fields_were_found() -> None:
    assert BOUND_CASES, "introspection found no bounded field"
    paths = {c.path for c in BOUND_CASES}
    # a few that must be there, from each kind of section and constraint
    assert {"model.moe.top_k", "model.dropout", "training.optimizer.lr", "data.text_field"} <= paths
    kinds = {c.constraint.split("=")[0] for c in BOUND_CASES}
    assert kinds == {"ge", "gt", "le", "lt", "min_length", "max_length"}


def test_bound_fixups_refer_to_bounded_fields() -> None:
    bounded = {(c.path, c.side) for c in BOUND_CASES} | {c.path for c in BOUND_CASES}
    stale = [key for key in BOUND_FIXUPS if key not in bounded]
    assert not stale, f"fixups for fields/sides without a bound: {stale}"


@pytest.mark.parametrize("case", BOUND_CASES, ids=[c.id for c in BOUND_CASES])
def test_value_just_outside_bound_fails_with_field_path(case: BoundCase) -> None:
    assert _error_paths(_bound_raw(case, case.bad)) == [case.path]


@pytest.mark.parametrize("case", BOUND_CASES, ids=[c.id for c in BOUND_CASES])
def test_value_at_bound_passes(case: BoundCase) -> None:
    paths = _error_paths(_bound_raw(case, case.good))
    assert paths == [], f"{case.id}: {case.good!r} should pass (add a BOUND_FIXUPS entry if a rule interferes)"
    spec = Spec.model_validate(_bound_raw(case, case.good))
    node: Any = spec
    for part in case.path.split("."):
        node = getattr(node, part)
    assert node == case.good


@pytest.mark.parametrize("case", BOUND_CASES, ids=[c.id for c in BOUND_CASES])
def test_json_schema_agrees_with_bound(case: BoundCase) -> None:
    """The browser editor validates with the JSON Schema: it must reject and accept the same values."""
    raw_bad = Spec.model_validate(_bound_raw(case, case.good)).model_dump(mode="json")
    _set(raw_bad, case.path, case.bad)
    assert [".".join(str(p) for p in e.absolute_path) for e in _schema_errors(raw_bad)] == [case.path]
    raw_good = Spec.model_validate(_bound_raw(case, case.good)).model_dump(mode="json")
    assert _schema_errors(raw_good) == []


# ----------------------------------------------------------------------------------------------------
# Literal fields


def _literal_fields() -> list[tuple[FieldCase, tuple[Any, ...]]]:
    out = []
    for field in FIELDS:
        ann = _unwrap_optional(field.info.annotation)
        if typing.get_origin(ann) is Literal:
            out.append((field, typing.get_args(ann)))
    return out


LITERAL_FIELDS = _literal_fields()
LITERAL_CHOICES = [(field, choice) for field, choices in LITERAL_FIELDS for choice in choices]

# choices that need other fields changed to be consistent
LITERAL_FIXUPS: dict[tuple[str, Any], dict[str, Any]] = {
    ("model.task", "classification"): {"model.num_labels": 2},
    ("model.attention", "gqa"): {"model.num_kv_heads": 2},
    ("training.loss", "focal"): {"model.task": "classification", "model.num_labels": 2},
}


def test_literal_fields_were_found() -> None:
    paths = {f.path for f, _ in LITERAL_FIELDS}
    assert {"version", "model.task", "model.moe.scoring", "training.precision", "data.tokenizer"} <= paths
    assert {"model.attention", "training.optimizer.name", "training.optimizer.adjust_lr"} <= paths


@pytest.mark.parametrize("field", [f for f, _ in LITERAL_FIELDS], ids=[f.key for f, _ in LITERAL_FIELDS])
def test_literal_rejects_unknown_value(field: FieldCase) -> None:
    assert _error_paths(_raw({**dict(field.fixup), field.path: "__not_a_choice__"})) == [field.path]


@pytest.mark.parametrize(("field", "choice"), LITERAL_CHOICES, ids=[f"{f.key}={c}" for f, c in LITERAL_CHOICES])
def test_literal_accepts_each_choice(field: FieldCase, choice: Any) -> None:
    path = field.path
    spec = _assert_valid(_raw({**dict(field.fixup), **LITERAL_FIXUPS.get((path, choice), {}), path: choice}))
    node: Any = spec
    for part in path.split("."):
        node = getattr(node, part)
    assert node == choice


# ----------------------------------------------------------------------------------------------------
# unknown keys


UNKNOWN_KEY_LEVELS = [
    "",
    "model",
    "model.mla",
    "model.moe",
    "training",
    "training.optimizer",
    "training.optimizer[adafactor]",
    "training.optimizer[sgd]",
    "training.optimizer[muon]",
    "training.schedule",
    "training.plateau",
    "training.anomaly",
    "training.distributed",
    "data",
]


def test_unknown_key_levels_cover_every_section() -> None:
    assert set(UNKNOWN_KEY_LEVELS) == set(SECTIONS)


def _bogus_key_raw(level: str, key: str = "bogus_key") -> tuple[str, dict[str, Any]]:
    section = SECTIONS[level]
    path = f"{section.path}.{key}" if section.path else key
    return path, {**dict(section.fixup), path: 1}


@pytest.mark.parametrize("level", UNKNOWN_KEY_LEVELS, ids=[lvl or "top" for lvl in UNKNOWN_KEY_LEVELS])
def test_unknown_key_is_rejected_with_its_path(level: str) -> None:
    path, overrides = _bogus_key_raw(level)
    assert _error_paths(_raw(overrides)) == [path]


def test_unknown_keys_at_several_levels_are_all_reported() -> None:
    levels = [lvl for lvl in UNKNOWN_KEY_LEVELS if not SECTIONS[lvl].fixup]  # one member of a union at a time
    paths = [f"{lvl}.extra" if lvl else "extra" for lvl in levels]
    assert sorted(_error_paths(_raw(dict.fromkeys(paths, 0)))) == sorted(paths)


# ----------------------------------------------------------------------------------------------------
# cross-field rules


@dataclass(frozen=True)
class RuleCase:
    id: str
    path: str
    bad: dict[str, Any]
    good: dict[str, Any]


RULE_CASES = [
    RuleCase(
        "num_heads_divides_hidden",
        "model.num_heads",
        {"model.hidden_size": 256, "model.num_heads": 3},
        {"model.hidden_size": 256, "model.num_heads": 4},
    ),
    RuleCase(
        "head_dim_even",
        "model.num_heads",
        {"model.hidden_size": 24, "model.num_heads": 8},  # head_dim 3
        {"model.hidden_size": 24, "model.num_heads": 4},  # head_dim 6
    ),
    RuleCase(
        "num_kv_heads_divides_num_heads",
        "model.num_kv_heads",
        {"model.attention": "gqa", "model.num_heads": 4, "model.num_kv_heads": 3},
        {"model.attention": "gqa", "model.num_heads": 4, "model.num_kv_heads": 2},
    ),
    RuleCase(
        "mha_has_a_kv_head_per_query_head",
        "model.num_kv_heads",
        {"model.attention": "mha", "model.num_heads": 4, "model.num_kv_heads": 2},
        {"model.attention": "mha", "model.num_heads": 4, "model.num_kv_heads": 4},
    ),
    RuleCase(
        "gqa_needs_num_kv_heads",
        "model.num_kv_heads",
        {"model.attention": "gqa", "model.num_kv_heads": None},
        {"model.attention": "gqa", "model.num_kv_heads": 1},
    ),
    RuleCase(
        "mla_has_no_num_kv_heads",
        "model.num_kv_heads",
        {"model.attention": "mla", "model.num_kv_heads": 4},
        {"model.attention": "mla", "model.num_kv_heads": None},
    ),
    RuleCase(
        "mla_rope_head_dim_even",
        "model.mla.qk_rope_head_dim",
        {"model.attention": "mla", "model.mla.qk_rope_head_dim": 15},
        {"model.attention": "mla", "model.mla.qk_rope_head_dim": 16},
    ),
    RuleCase(
        "mtp_only_for_causal_lm",
        "model.mtp_depth",
        {"model.task": "classification", "model.num_labels": 2, "model.mtp_depth": 1},
        {"model.task": "classification", "model.num_labels": 2, "model.mtp_depth": 0},
    ),
    RuleCase(
        "n_group_divides_routed_experts",
        "model.moe.n_group",
        {"model.moe.num_routed_experts": 8, "model.moe.n_group": 3},
        {"model.moe.num_routed_experts": 8, "model.moe.n_group": 4},
    ),
    RuleCase(
        "topk_group_le_n_group",
        "model.moe.topk_group",
        {"model.moe.n_group": 4, "model.moe.topk_group": 5},
        {"model.moe.n_group": 4, "model.moe.topk_group": 4},
    ),
    RuleCase(
        "top_k_within_the_eligible_groups",
        "model.moe.topk_group",
        {"model.moe.num_routed_experts": 8, "model.moe.top_k": 3, "model.moe.n_group": 4, "model.moe.topk_group": 1},
        {"model.moe.num_routed_experts": 8, "model.moe.top_k": 3, "model.moe.n_group": 4, "model.moe.topk_group": 2},
    ),
    RuleCase(
        "top_k_le_routed_experts",
        "model.moe.top_k",
        {"model.moe.num_routed_experts": 8, "model.moe.top_k": 9},
        {"model.moe.num_routed_experts": 8, "model.moe.top_k": 8},
    ),
    RuleCase(
        "first_dense_layers_le_num_layers",
        "model.moe.first_dense_layers",
        {"model.num_layers": 4, "model.moe.first_dense_layers": 5},
        {"model.num_layers": 4, "model.moe.first_dense_layers": 4},
    ),
    RuleCase(
        "classification_needs_num_labels",
        "model.num_labels",
        {"model.task": "classification"},
        {"model.task": "classification", "model.num_labels": 2},
    ),
    RuleCase(
        "causal_lm_has_no_num_labels",
        "model.num_labels",
        {"model.task": "causal_lm", "model.num_labels": 2},
        {"model.task": "causal_lm", "model.num_labels": None},
    ),
    RuleCase(
        "focal_loss_only_for_classification",
        "training.loss",
        {"model.task": "causal_lm", "training.loss": "focal"},
        {"model.task": "classification", "model.num_labels": 2, "training.loss": "focal"},
    ),
    RuleCase(
        "warmup_le_max_steps",
        "training.schedule.warmup_steps",
        {"training.max_steps": 1000, "training.schedule.warmup_steps": 1001},
        {"training.max_steps": 1000, "training.schedule.warmup_steps": 1000},
    ),
    RuleCase(
        "seq_len_le_max_seq_len",
        "data.seq_len",
        {"model.max_seq_len": 256, "data.seq_len": 257},
        {"model.max_seq_len": 256, "data.seq_len": 256},
    ),
    RuleCase(
        "bpe_vocab_le_vocab_size",
        "data.bpe_vocab_size",
        {"model.vocab_size": 8192, "data.bpe_vocab_size": 8193},
        {"model.vocab_size": 8192, "data.bpe_vocab_size": 8192},
    ),
    RuleCase(
        "bytes_tokenizer_has_no_bpe_vocab",
        "data.bpe_vocab_size",
        {"data.tokenizer": "bytes", "data.bpe_vocab_size": 300},
        {"data.tokenizer": "bytes", "data.bpe_vocab_size": None},
    ),
]


def test_every_cross_field_rule_has_a_case() -> None:
    """One RuleCase per rule: a new rule in cross_field_problems must come with a test here."""
    n_rules = inspect.getsource(cross_field_problems).count("out.append(")
    assert len(RULE_CASES) == n_rules
    assert len({c.id for c in RULE_CASES}) == len(RULE_CASES)


@pytest.mark.parametrize("case", RULE_CASES, ids=[c.id for c in RULE_CASES])
def test_cross_field_rule_fails_with_path(case: RuleCase) -> None:
    assert _error_paths(_raw(case.bad)) == [case.path]
    # load_spec (migrate + validate) reports the same
    with pytest.raises(ValidationError) as info:
        load_spec(_raw(case.bad))
    assert [e["path"] for e in spec_errors(info.value)] == [case.path]


@pytest.mark.parametrize("case", RULE_CASES, ids=[c.id for c in RULE_CASES])
def test_cross_field_rule_nearby_valid_case_passes(case: RuleCase) -> None:
    spec = _assert_valid(_raw(case.good))
    assert cross_field_problems(spec) == []


@pytest.mark.parametrize("case", RULE_CASES, ids=[c.id for c in RULE_CASES])
def test_cross_field_problems_direct(case: RuleCase) -> None:
    """cross_field_problems itself, on a spec whose fields are set after validation (no validator runs)."""
    bad = Spec()
    for path, value in case.bad.items():
        *parents, leaf = path.split(".")
        node: Any = bad
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    problems = cross_field_problems(bad)
    assert [p for p, _ in problems] == [case.path]
    assert all(isinstance(m, str) and m for _, m in problems)


def test_several_cross_field_violations_are_all_reported() -> None:
    raw = _raw(
        {
            "model.hidden_size": 256,
            "model.num_heads": 3,  # does not divide 256
            "model.num_kv_heads": 2,  # does not divide 3
            "model.moe.num_routed_experts": 4,
            "model.moe.top_k": 5,
            "model.num_layers": 2,
            "model.moe.first_dense_layers": 3,
            "model.task": "causal_lm",
            "model.num_labels": 5,
            "training.loss": "focal",
            "training.max_steps": 10,
            "training.schedule.warmup_steps": 11,
            "model.max_seq_len": 64,
            "data.seq_len": 128,
            "model.vocab_size": 1000,
            "data.tokenizer": "bytes",
            "data.bpe_vocab_size": 2000,  # > vocab_size and not null with bytes: two problems
        }
    )
    expected = [
        "model.num_heads",
        "model.num_kv_heads",
        "model.moe.top_k",
        "model.moe.first_dense_layers",
        "model.num_labels",
        "training.loss",
        "training.schedule.warmup_steps",
        "data.seq_len",
        "data.bpe_vocab_size",
        "data.bpe_vocab_size",
    ]
    assert _error_paths(raw) == expected
    with pytest.raises(ValidationError) as info:
        Spec.model_validate(raw)
    messages = [e["message"] for e in spec_errors(info.value)]
    assert len(set(messages)) == len(messages)  # each problem has its own message


def test_field_errors_in_several_sections_are_all_reported() -> None:
    raw = _raw(
        {
            "model.moe.top_k": 0,
            "model.dropout": 1.0,
            "training.optimizer.lr": 0.0,
            "training.anomaly.window": 2,
            "data.seq_len": 1,
            "version": 2,
        }
    )
    assert sorted(_error_paths(raw)) == sorted(
        [
            "model.moe.top_k",
            "model.dropout",
            "training.optimizer.lr",
            "training.anomaly.window",
            "data.seq_len",
            "version",
        ]
    )


# ----------------------------------------------------------------------------------------------------
# betas


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("value", [-1e-9, -0.5, 1.0, 1.5, math.nan, math.inf])
def test_beta_out_of_range_reports_its_index(index: int, value: float) -> None:
    betas = [0.9, 0.95]
    betas[index] = value
    assert _error_paths(_raw({"training.optimizer.betas": betas})) == [f"training.optimizer.betas.{index}"]


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("value", [0.0, math.nextafter(1.0, 0.0)])
def test_beta_at_range_edges_passes(index: int, value: float) -> None:
    betas = [0.9, 0.95]
    betas[index] = value
    spec = _assert_valid(_raw({"training.optimizer.betas": betas}))
    assert isinstance(spec.training.optimizer, spec_mod.AdamWSpec)
    assert spec.training.optimizer.betas[index] == value


@pytest.mark.parametrize(
    ("betas", "path"),
    [
        ([0.9], "training.optimizer.betas.1"),
        (["x", 0.95], "training.optimizer.betas.0"),
        ([0.9, "x"], "training.optimizer.betas.1"),
        ([0.9, 0.95, 0.99], "training.optimizer.betas"),
    ],
)
def test_betas_shape_and_type_errors_name_the_element(betas: list[Any], path: str) -> None:
    assert _error_paths(_raw({"training.optimizer.betas": betas})) == [path]


def test_both_bad_betas_are_reported() -> None:
    paths = _error_paths(_raw({"training.optimizer.betas": [1.0, 1.0]}))
    assert paths == ["training.optimizer.betas.0", "training.optimizer.betas.1"]


def test_json_schema_rejects_out_of_range_betas() -> None:
    raw = Spec().model_dump(mode="json")
    raw["training"]["optimizer"]["betas"] = [1.5, 0.95]
    assert _schema_errors(raw)


# ----------------------------------------------------------------------------------------------------
# defaults, round trip, JSON Schema


def _round_trip_specs() -> list[Spec]:
    return [
        Spec(),
        Spec.model_validate(
            _raw(
                {
                    "model.task": "classification",
                    "model.num_labels": 7,
                    "model.num_kv_heads": 2,
                    "model.moe.dense_hidden_size": 1000,
                    "model.moe.capacity_factor": 1.25,
                    "model.moe.scoring": "sigmoid",
                    "training.loss": "focal",
                    "training.grad_clip": None,
                    "training.optimizer.betas": [0.8, 0.999],
                    "training.optimizer.eps": 1e-10,
                    "training.early_stopping_patience": 4,
                    "data.bpe_vocab_size": 4000,
                    "data.text_field": "sentence ü",
                }
            )
        ),
        Spec.model_validate(
            _raw(
                {
                    "model.attention": "mla",
                    "model.mla.q_lora_rank": 96,
                    "model.mtp_depth": 1,
                    "model.moe.n_group": 4,
                    "model.moe.topk_group": 2,
                    "model.moe.routed_scaling_factor": 2.5,
                    "training.optimizer": {"name": "muon", "adamw_betas": [0.9, 0.99], "adjust_lr": "original"},
                    "training.schedule.kind": "wsd",
                    "training.mtp_loss_weight": 0.1,
                }
            )
        ),
    ]


def test_defaults_validate() -> None:
    spec = Spec()
    assert spec.version == SPEC_VERSION
    assert cross_field_problems(spec) == []
    assert Spec.model_validate({}) == spec
    assert load_spec({}) == spec
    assert _error_paths(spec.model_dump(mode="json")) == []


@pytest.mark.parametrize("spec", _round_trip_specs(), ids=["defaults", "non_defaults", "deepseek_v3_parts"])
def test_round_trip_through_json(spec: Spec) -> None:
    dumped = spec.model_dump(mode="json")
    assert Spec.model_validate(dumped) == spec
    assert Spec.model_validate(json.loads(json.dumps(dumped))) == spec
    assert Spec.model_validate_json(spec.model_dump_json()) == spec
    assert load_spec(dumped) == spec


def test_json_schema_is_json_and_described() -> None:
    schema = json.loads(json.dumps(json_schema()))
    assert schema == Spec.model_json_schema()
    assert schema["type"] == "object"
    objects = [schema, *schema.get("$defs", {}).values()]
    n_props = 0
    for obj in objects:
        for name, prop in obj["properties"].items():
            assert isinstance(prop.get("description"), str) and prop["description"].strip(), name
            n_props += 1
    assert n_props == len(FIELDS)


def _schema_objects(node: Any) -> list[dict[str, Any]]:
    """Every JSON Schema node that describes an object with properties."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            found.append(node)
        for value in node.values():
            found.extend(_schema_objects(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_schema_objects(value))
    return found


def test_json_schema_forbids_additional_properties_at_every_level() -> None:
    objects = _schema_objects(json_schema())
    assert len(objects) == len(SECTIONS)
    for obj in objects:
        assert obj.get("additionalProperties") is False, obj.get("title")


def _schema_validator() -> Any:
    pytest.importorskip("jsonschema")
    return _cached_schema_validator()


@functools.cache
def _cached_schema_validator() -> Any:
    import jsonschema

    schema = json_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _schema_errors(raw: dict[str, Any]) -> list[Any]:
    """The JSON Schema's errors for ``raw``, a ``oneOf`` (the optimizer) replaced by the errors of the member
    that ``raw`` chose by its ``name`` (the member whose ``name`` matched)."""

    def about_name(error: Any) -> bool:
        return list(error.relative_path)[-1:] == ["name"] or (
            error.validator == "required" and "'name'" in error.message
        )

    def flatten(errors: Any) -> list[Any]:
        out = []
        for error in errors:
            if error.validator != "oneOf":
                out.append(error)
                continue
            by_member: dict[int, list[Any]] = {}
            for sub in error.context:
                by_member.setdefault(sub.schema_path[0], []).append(sub)
            matched = [subs for subs in by_member.values() if not any(about_name(e) for e in subs)]
            assert len(matched) == 1, [e.message for e in error.context]
            out.extend(flatten(matched[0]))
        return out

    return flatten(_schema_validator().iter_errors(raw))


def test_json_schema_is_a_valid_schema_that_accepts_the_defaults() -> None:
    for spec in _round_trip_specs():
        assert _schema_errors(spec.model_dump(mode="json")) == []
    assert _schema_errors({}) == []


@pytest.mark.parametrize("level", UNKNOWN_KEY_LEVELS, ids=[lvl or "top" for lvl in UNKNOWN_KEY_LEVELS])
def test_json_schema_rejects_unknown_key(level: str) -> None:
    section = SECTIONS[level]
    raw = Spec.model_validate(_raw(dict(section.fixup))).model_dump(mode="json")
    _set(raw, f"{section.path}.bogus_key" if section.path else "bogus_key", 1)
    errors = _schema_errors(raw)
    assert len(errors) == 1
    assert errors[0].validator == "additionalProperties"
    assert ".".join(str(p) for p in errors[0].absolute_path) == section.path


# ----------------------------------------------------------------------------------------------------
# migrate


def test_migrations_cover_every_older_version() -> None:
    assert set(MIGRATIONS) == set(range(1, SPEC_VERSION))


def test_dict_without_version_is_taken_as_current() -> None:
    raw = _raw({"model.num_layers": 6})
    migrated = migrate(raw)
    assert migrated == raw
    spec = load_spec(raw)
    assert spec.version == SPEC_VERSION
    assert spec.model.num_layers == 6


def test_migrate_does_not_mutate_its_input() -> None:
    raw = _raw({"version": SPEC_VERSION, "model.num_layers": 6})
    before = copy.deepcopy(raw)
    migrate(raw)
    assert raw == before


def test_current_version_is_unchanged() -> None:
    raw = Spec().model_dump(mode="json")
    assert migrate(raw) == raw


@pytest.mark.parametrize("version", [99, SPEC_VERSION + 1, 0, -1, "1", "abc", None, 1.5])
def test_unknown_version_fails_on_version_path(version: Any) -> None:
    raw = {"version": version}
    assert migrate(raw) == raw  # left for validation to report
    with pytest.raises(ValidationError) as info:
        load_spec(raw)
    assert [e["path"] for e in spec_errors(info.value)] == ["version"]


def test_migration_chain_runs_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mechanism, with a pretend v2 and v3: each step sees the previous one's output."""
    monkeypatch.setattr(spec_mod, "SPEC_VERSION", 3)
    calls: list[int] = []

    def v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
        calls.append(d["version"])
        out = {k: v for k, v in d.items() if k != "old"}
        out["renamed"] = d.get("old")
        return out

    def v2_to_v3(d: dict[str, Any]) -> dict[str, Any]:
        calls.append(d["version"])
        return {**d, "step": 3}

    monkeypatch.setitem(spec_mod.MIGRATIONS, 1, v1_to_v2)
    monkeypatch.setitem(spec_mod.MIGRATIONS, 2, v2_to_v3)
    raw = {"version": 1, "old": "x"}
    out = spec_mod.migrate(raw)
    assert calls == [1, 2]
    assert out == {"version": 3, "renamed": "x", "step": 3}
    assert raw == {"version": 1, "old": "x"}
    assert spec_mod.migrate({"version": 2}) == {"version": 3, "step": 3}
    assert spec_mod.migrate({"version": 3, "a": 1}) == {"version": 3, "a": 1}


# ----------------------------------------------------------------------------------------------------
# specs written before attention options and optimizer choices existed


def test_an_optimizer_without_a_name_is_adamw_with_the_same_values() -> None:
    old = {"lr": 1e-3, "betas": [0.8, 0.99], "eps": 1e-7, "weight_decay": 0.05}
    spec = load_spec(_raw({"training.optimizer": old}))
    assert spec.training.optimizer == spec_mod.AdamWSpec.model_validate({"name": "adamw", **old})
    assert spec.training.optimizer.model_dump(mode="json") == {"name": "adamw", **old}
    assert Spec().training.optimizer.name == "adamw"


def test_num_kv_heads_alone_still_means_grouped_query_attention() -> None:
    assert Spec.model_validate(_raw({"model.num_kv_heads": 2})).model.attention == "gqa"
    assert Spec.model_validate(_raw({"model.num_kv_heads": 4})).model.attention == "mha"  # as many as heads
    # An explicit choice is never overridden: mha with fewer key/value heads is an error on num_kv_heads.
    assert _error_paths(_raw({"model.attention": "mha", "model.num_kv_heads": 2})) == ["model.num_kv_heads"]


@pytest.mark.parametrize(
    ("optimizer", "path"),
    [
        ({"name": "adagrad"}, "training.optimizer.name"),
        ({"name": "muon", "adamw_betas": [0.9, 1.0]}, "training.optimizer.adamw_betas.1"),
        ({"name": "muon", "betas": [0.9, 0.95]}, "training.optimizer.betas"),  # AdamW's field, not Muon's
        ({"name": "sgd", "momentum": 0.0}, "training.optimizer.momentum"),
        ({"name": "adafactor", "beta2_decay": 0.5}, "training.optimizer.beta2_decay"),
        ({"name": "adamw", "ns_steps": 5}, "training.optimizer.ns_steps"),
    ],
)
def test_optimizer_errors_name_the_field_as_written(optimizer: dict[str, Any], path: str) -> None:
    assert _error_paths(_raw({"training.optimizer": optimizer})) == [path]


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd", "muon"])
def test_each_optimizer_validates_with_its_defaults_and_the_schema_agrees(name: str) -> None:
    spec = _assert_valid(_raw({"training.optimizer": {"name": name}}))
    assert spec.training.optimizer.name == name
    assert _schema_errors(spec.model_dump(mode="json")) == []
    wrong = spec.model_dump(mode="json")
    wrong["training"]["optimizer"]["name"] = "adagrad"
    errors = list(_schema_validator().iter_errors(wrong))  # no member of the oneOf takes it
    assert [e.validator for e in errors] == ["oneOf"] and list(errors[0].absolute_path) == ["training", "optimizer"]
