"""Configs API: saved configs and their versions, spec validation/estimates/schema, templates, hardware.

Errors of every endpoint here are ``400 {"errors": [{"path": "spec.model.moe.top_k", "message": ...}]}``:
one entry per problem, each naming the dotted path of the field (``""`` for the request as a whole); the views set
``errors_as_paths`` and ``builder.core.errors.exception_handler`` renders them.
A config that is not the caller's answers 404, exactly like one that does not exist.
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from django.urls import path
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builder.accounts import audit
from builder.accounts.models import AuditAction
from builder.configs import serializers as s
from builder.configs.models import Config, ConfigVersion, HardwareCalibration, VersionSource
from builder.configs.presets import PRESETS
from builder.configs.services import (
    EstimateRequest,
    advice_for_raw,
    calibration_factor,
    create_config,
    estimate_with_advice,
    parse_spec,
    save_version,
    stored_spec,
    visible_configs,
)
from builder.configs.specdiff import diff_specs
from builder.core.errors import Refusal
from builder.core.openapi import PATH_ERRORS, PathErrorSerializer
from builder.core.parsers import MAX_DB_INT, db_int
from builder.core.profiles import hardware_profile, hardware_profiles
from workers.engine.spec import json_schema

ERRORS = PATH_ERRORS
VERSION_NUMBER = {"type": "integer", "minimum": 1, "maximum": MAX_DB_INT}
VALIDATE_RESPONSE = inline_serializer(
    "ValidateResponse",
    {
        "valid": serializers.BooleanField(),
        "errors": PathErrorSerializer(many=True),
        "warnings": s.AdviceSerializer(many=True),
        "spec": serializers.DictField(allow_null=True, help_text="The complete spec (defaults filled in) if valid."),
    },
)


class PathErrorView(APIView):
    """Answers refusals and validation errors as a flat list of field paths (see the module docstring)."""

    errors_as_paths = True


def _config_for(request: Request, config_id: int) -> Config:
    return get_object_or_404(visible_configs(request.user), pk=config_id)


def _valid(serializer_class: type[serializers.Serializer[Any]], request: Request) -> dict[str, Any]:
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


class ConfigListView(PathErrorView):
    @extend_schema(responses=s.ConfigSerializer(many=True), summary="Your saved configs, newest first")
    def get(self, request: Request) -> Response:
        configs: QuerySet[Config] = visible_configs(request.user).prefetch_related("versions")
        return Response(s.ConfigSerializer(configs[:500], many=True).data)

    @extend_schema(
        request=s.ConfigCreateSerializer,
        responses={201: s.ConfigSerializer, 400: ERRORS},
        summary="Save a new config (its version 1)",
    )
    def post(self, request: Request) -> Response:
        data = _valid(s.ConfigCreateSerializer, request)
        config = create_config(
            request.user, data["name"], data["description"], data["spec"], source=data["source"], note=data["note"]
        )
        return Response(s.ConfigSerializer(config).data, status=status.HTTP_201_CREATED)


class ConfigDetailView(PathErrorView):
    @extend_schema(responses={200: s.ConfigSerializer, 404: OpenApiResponse(description="not yours")})
    def get(self, request: Request, config_id: int) -> Response:
        return Response(s.ConfigSerializer(_config_for(request, config_id)).data)

    @extend_schema(
        request=s.ConfigUpdateSerializer,
        responses={200: s.ConfigSerializer, 400: ERRORS},
        summary="Rename or describe a config; a spec saves a new version",
    )
    def patch(self, request: Request, config_id: int) -> Response:
        config = _config_for(request, config_id)
        data = _valid(s.ConfigUpdateSerializer, request)
        if "name" in data and data["name"] != config.name:
            if visible_configs(request.user).filter(name=data["name"]).exclude(pk=config.pk).exists():
                raise Refusal("name", f"you already have a config named {data['name']!r}", 409)
            config.name = data["name"]
        if "description" in data:
            config.description = data["description"]
        try:
            with transaction.atomic():
                config.save()
        except IntegrityError:  # a concurrent rename took the name between the check and the save
            raise Refusal("name", f"you already have a config named {config.name!r}", 409) from None
        if "spec" in data:
            save_version(config, data["spec"], source=VersionSource.API, note=data["note"])
        return Response(s.ConfigSerializer(config).data)

    @extend_schema(responses={204: None}, summary="Delete a config and all its versions")
    def delete(self, request: Request, config_id: int) -> Response:
        config = _config_for(request, config_id)
        target = audit.Target.of(config)
        config.delete()
        audit.record(request, AuditAction.DELETION, target)
        return Response(status=status.HTTP_204_NO_CONTENT)


class VersionListView(PathErrorView):
    @extend_schema(responses=s.VersionSummarySerializer(many=True), summary="Versions of a config, oldest first")
    def get(self, request: Request, config_id: int) -> Response:
        config = _config_for(request, config_id)
        return Response(s.VersionSummarySerializer(config.versions.order_by("number"), many=True).data)

    @extend_schema(
        request=s.VersionCreateSerializer,
        responses={201: s.VersionSerializer, 400: ERRORS},
        summary="Save a new version of a config",
    )
    def post(self, request: Request, config_id: int) -> Response:
        config = _config_for(request, config_id)
        data = _valid(s.VersionCreateSerializer, request)
        version = save_version(config, data["spec"], source=data["source"], note=data["note"])
        return Response(s.VersionSerializer(version).data, status=status.HTTP_201_CREATED)


class VersionDetailView(PathErrorView):
    @extend_schema(responses=s.VersionSerializer, summary="One version with its spec")
    def get(self, request: Request, config_id: int, number: int) -> Response:
        config = _config_for(request, config_id)
        return Response(s.VersionSerializer(get_object_or_404(ConfigVersion, config=config, number=number)).data)


class DiffView(PathErrorView):
    @extend_schema(
        parameters=[
            OpenApiParameter("a", VERSION_NUMBER, required=True, description="A version number"),
            OpenApiParameter("b", VERSION_NUMBER, required=True, description="Another version number"),
        ],
        responses={200: s.DiffSerializer, 400: ERRORS},
        summary="Fields that differ between two versions",
    )
    def get(self, request: Request, config_id: int) -> Response:
        config = _config_for(request, config_id)
        numbers: dict[str, int] = {}
        errors: list[tuple[str, str]] = []
        for key in ("a", "b"):
            raw = request.query_params.get(key, "")
            number = db_int(raw)
            if number is None:
                errors.append((key, "a version number is required"))
                continue
            numbers[key] = number
        if errors:
            raise Refusal.of(errors)
        # A well-formed number that names no version names a missing object: 404, like a missing config.
        missing = [
            (k, f"{config.name} has no version {n}")
            for k, n in numbers.items()
            if not config.versions.filter(number=n).exists()
        ]
        if missing:
            raise Refusal.of(missing, 404)
        before = config.versions.get(number=numbers["a"]).spec
        after = config.versions.get(number=numbers["b"]).spec
        changes = [{"path": c.path, "before": c.before, "after": c.after} for c in diff_specs(before, after)]
        return Response({"a": numbers["a"], "b": numbers["b"], "changes": changes})


class ValidateView(PathErrorView):
    @extend_schema(
        request=s.SpecRequestSerializer,
        responses={200: VALIDATE_RESPONSE, 400: ERRORS},
        summary="Validate a spec: errors by field path, plus advice",
        description="200 whether or not the spec is valid (`valid` says); 400 only when the request itself is "
        "malformed. `warnings` are lint advice (with `hardware`, device checks too).",
    )
    def post(self, request: Request) -> Response:
        data = _valid(s.SpecRequestSerializer, request)
        hardware = hardware_profile(data["hardware"]) if data.get("hardware") else None
        raw = data["spec"]
        try:
            spec = parse_spec(raw)
        except Refusal as exc:  # an answer, not an error: 200 with valid false
            warnings = advice_for_raw(raw, hardware, data["num_gpus"])
            errors = [e.as_dict() for e in exc.errors]
            return Response({"valid": False, "errors": errors, "warnings": warnings, "spec": None})
        warnings = advice_for_raw(stored_spec(spec), hardware, data["num_gpus"])
        return Response({"valid": True, "errors": [], "warnings": warnings, "spec": stored_spec(spec)})


class EstimateView(PathErrorView):
    @extend_schema(
        request=s.EstimateRequestSerializer,
        responses={200: s.EstimateResponseSerializer, 400: ERRORS},
        summary="Predict parameters, FLOPs, memory, time and out-of-memory risk on a hardware profile",
        description="Times are calibrated by the profile's measured step-time factor when a worker has "
        "calibrated it (see /api/hardware).",
    )
    def post(self, request: Request) -> Response:
        data = _valid(s.EstimateRequestSerializer, request)
        result = estimate_with_advice(
            data["spec"],
            EstimateRequest(
                hardware_profile(data["hardware"]),
                data.get("num_gpus"),
                data.get("parallelism"),
                data.get("dataset_tokens"),
            ),
        )
        return Response(result)


class SchemaView(APIView):
    @extend_schema(
        responses={200: OpenApiResponse(description="JSON Schema (draft 2020-12) of a spec")},
        summary="The JSON Schema the editor validates against",
    )
    def get(self, request: Request) -> Response:
        return Response(json_schema())


class TemplateListView(APIView):
    @extend_schema(responses=s.TemplateSerializer(many=True), summary="The template library")
    def get(self, request: Request) -> Response:
        return Response([p.as_dict() for p in PRESETS.values()])


class TemplateDetailView(APIView):
    @extend_schema(responses={200: s.TemplateSerializer, 404: OpenApiResponse(description="no such template")})
    def get(self, request: Request, name: str) -> Response:
        preset = PRESETS.get(name)
        if preset is None:
            return Response({"detail": f"no template {name!r}"}, status=status.HTTP_404_NOT_FOUND)
        return Response(preset.as_dict())


class HardwareListView(APIView):
    @extend_schema(responses=s.HardwareSerializer(many=True), summary="Hardware profiles and their calibration")
    def get(self, request: Request) -> Response:
        keys = (
            "key", "name", "kind", "memory_bytes", "bandwidth_bytes_per_s", "peak_flops", "efficiency",
            "layer_overhead_seconds", "notes",
        )  # fmt: skip
        rows = []
        for p in hardware_profiles().values():
            d = p.as_dict()
            rows.append(
                {**{k: d[k] for k in keys}, "max_devices": p.max_devices, "calibration_factor": calibration_factor(p)}
            )
        return Response(rows)


class CalibrationListView(PathErrorView):
    @extend_schema(responses=s.CalibrationSerializer(many=True), summary="Your calibration runs")
    def get(self, request: Request) -> Response:
        rows = HardwareCalibration.objects.filter(requested_by=request.user.pk)[:100]
        return Response(s.CalibrationSerializer(rows, many=True).data)

    @extend_schema(
        request=s.CalibrationCreateSerializer,
        responses={202: s.CalibrationSerializer, 400: ERRORS},
        summary="Time a short training run on a worker to calibrate its hardware profile",
        description="Queued on `gpu` (the training device). When it succeeds, the profile of the worker's device "
        "gets factor = measured / predicted step time, and estimates use the median of the last 5.",
    )
    def post(self, request: Request) -> Response:
        from builder.configs.calibration import request_calibration

        data = _valid(s.CalibrationCreateSerializer, request)
        spec = data.get("spec") or PRESETS["tiny-cpu-demo"].spec
        calibration = request_calibration(request.user, spec, data["steps"])
        return Response(s.CalibrationSerializer(calibration).data, status=status.HTTP_202_ACCEPTED)


class CalibrationDetailView(APIView):
    @extend_schema(responses={200: s.CalibrationSerializer, 404: OpenApiResponse(description="not yours")})
    def get(self, request: Request, calibration_id: int) -> Response:
        calibration = get_object_or_404(HardwareCalibration, pk=calibration_id, requested_by=request.user.pk)
        return Response(s.CalibrationSerializer(calibration).data)


urlpatterns = [
    path("configs", ConfigListView.as_view(), name="api-configs"),
    path("configs/<int:config_id>", ConfigDetailView.as_view(), name="api-config"),
    path("configs/<int:config_id>/versions", VersionListView.as_view(), name="api-config-versions"),
    path("configs/<int:config_id>/versions/<int:number>", VersionDetailView.as_view(), name="api-config-version"),
    path("configs/<int:config_id>/diff", DiffView.as_view(), name="api-config-diff"),
    path("specs/validate", ValidateView.as_view(), name="api-specs-validate"),
    path("specs/estimate", EstimateView.as_view(), name="api-specs-estimate"),
    path("specs/schema", SchemaView.as_view(), name="api-specs-schema"),
    path("templates", TemplateListView.as_view(), name="api-templates"),
    path("templates/<slug:name>", TemplateDetailView.as_view(), name="api-template"),
    path("hardware", HardwareListView.as_view(), name="api-hardware"),
    path("hardware/calibrations", CalibrationListView.as_view(), name="api-calibrations"),
    path("hardware/calibrations/<int:calibration_id>", CalibrationDetailView.as_view(), name="api-calibration"),
]
