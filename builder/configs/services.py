"""What the configs API and pages share: validation with field paths, saving versions, estimates with advice.

Every spec that is stored went through ``workers.engine.spec.load_spec`` and is stored complete (defaults
filled in). Every lookup of a config goes through ``visible_configs(user)``: a config is its owner's alone, and
anything else is answered as if it did not exist (404, never 403).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, cast

from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from pydantic import ValidationError

from builder.configs.models import Config, ConfigVersion, HardwareCalibration
from builder.core.durable import WorkState
from builder.core.errors import Refusal
from workers.engine.estimate import Parallelism, estimate, estimate_time
from workers.engine.hardware import HardwareProfile
from workers.engine.lint import lint, lint_raw
from workers.engine.spec import Spec, load_spec, spec_errors

# How many recent calibrations of a profile the applied factor is the median of.
CALIBRATION_WINDOW = 5


def parse_spec(raw: Any) -> Spec:
    """Validate ``raw`` (a JSON object) into a ``Spec``, or raise a ``Refusal`` naming every field at fault
    (``model.moe.top_k``; "" for the spec as a whole).

    The refusal's status is 400 when the spec does not match its JSON Schema (a wrong type, a value out of
    bounds, an unknown field), and 422 when it matches it but breaks a rule between fields that no JSON Schema
    states (``spec_status``)."""
    if not isinstance(raw, dict):
        raise Refusal("", "a spec must be a JSON object")
    try:
        return load_spec(raw)
    except ValidationError as exc:
        raise Refusal.of(((e["path"], e["message"]) for e in spec_errors(exc)), spec_status(exc)) from None


def spec_status(exc: ValidationError) -> int:
    """422 when every problem of ``exc`` is a cross-field rule (the spec matches its published schema), else 400."""
    return 422 if all(e["type"] == "cross_field" for e in exc.errors()) else 400


def stored_spec(spec: Spec) -> dict[str, Any]:
    """The form a spec is stored and compared in: complete, JSON types."""
    return spec.model_dump(mode="json")


def visible_configs(user: Any) -> QuerySet[Config]:
    """The configs ``user`` (a request's user, maybe anonymous) may see and change: their own."""
    if not user.is_authenticated:
        return Config.objects.none()
    return Config.objects.filter(owner=user)


def create_config(owner: Any, name: str, description: str, spec: Spec, *, source: str, note: str = "") -> Config:
    """A new config with ``spec`` as version 1; a ``Refusal`` (field ``name``) when the owner already has that
    name."""
    try:
        with transaction.atomic():
            config = Config.objects.create(owner=owner, name=name, description=description)
            ConfigVersion.objects.create(config=config, number=1, spec=stored_spec(spec), source=source, note=note)
    except IntegrityError:
        # 409: the name is well-formed; another of the owner's configs holds it.
        raise Refusal("name", f"you already have a config named {name!r}", 409) from None
    return config


def save_version(config: Config, spec: Spec, *, source: str, note: str = "") -> ConfigVersion:
    """Append a version (number = last + 1). The config row is locked so concurrent saves queue up
    (PostgreSQL); SQLite serialises writers anyway, and the unique (config, number) guards both."""
    with transaction.atomic():
        Config.objects.select_for_update().filter(pk=config.pk).first()
        last = config.versions.order_by("-number").values_list("number", flat=True).first() or 0
        version = ConfigVersion.objects.create(
            config=config, number=last + 1, spec=stored_spec(spec), source=source, note=note
        )
        Config.objects.filter(pk=config.pk).update(updated_at=version.created_at)
    return version


def calibration_factor(profile: HardwareProfile) -> float:
    """Median, over the profile's last ``CALIBRATION_WINDOW`` successful calibrations (everyone's: it describes
    the hardware), of each one's measured step time over what the estimator predicts for its spec now, on
    ``profile``; 1.0 when there are none.

    Predicting again instead of reading each row's stored ``factor`` keeps a calibration meaning "this device
    runs at X times the estimator's prediction" when the prediction moves: the CPU profile takes the rates its
    workers measure (``builder.core.profiles``), and a release may add a term to the estimator. A stored factor
    is relative to the prediction of its day, and applied to today's it would correct twice. A row whose spec
    no longer validates is left out."""
    rows = (
        HardwareCalibration.objects.filter(
            hardware=profile.key, state=WorkState.SUCCEEDED, measured_step_seconds__isnull=False
        )
        .order_by("-finished_at", "-id")
        .values_list("spec", "measured_step_seconds")[:CALIBRATION_WINDOW]
    )
    factors = []
    for raw, measured in rows:
        try:
            spec = load_spec(raw)
        except ValueError:  # pydantic's ValidationError included: a spec of an older schema
            continue
        predicted = estimate_time(spec, profile).step_seconds
        if predicted > 0 and measured is not None and measured > 0:
            factors.append(measured / predicted)
    return float(statistics.median(factors)) if factors else 1.0


LAYOUTS = ("ddp", "expert", "fsdp")


@dataclass(frozen=True)
class EstimateRequest:
    """What to estimate on. ``num_gpus``/``parallelism`` None: what the spec's ``training.distributed`` asks for."""

    hardware: HardwareProfile
    num_gpus: int | None = None
    parallelism: str | None = None
    dataset_tokens: int | None = None


def estimate_with_advice(spec: Spec, request: EstimateRequest) -> dict[str, Any]:
    """The estimate (calibrated for the hardware) and the lint advice, as one JSON-able dict."""
    result = estimate(
        spec,
        request.hardware,
        num_gpus=request.num_gpus,
        parallelism=cast(Parallelism, request.parallelism) if request.parallelism in LAYOUTS else None,
        calibration=calibration_factor(request.hardware),
        dataset_tokens=request.dataset_tokens,
    )
    devices = request.num_gpus or spec.training.distributed.devices
    advice = lint(spec, hardware=request.hardware, num_gpus=devices, dataset_tokens=request.dataset_tokens)
    return {"estimate": result.as_dict(), "warnings": [a.as_dict() for a in advice]}


def advice_for_raw(raw: Any, hardware: HardwareProfile | None = None, num_gpus: int = 1) -> list[dict[str, Any]]:
    """Lint advice for a spec that may not validate (cross-field mistakes still get their fix)."""
    if not isinstance(raw, dict):
        return []
    return [a.as_dict() for a in lint_raw(raw, hardware=hardware, num_gpus=num_gpus)]
