"""What the configs API accepts and returns. Specs are validated by ``workers.engine.spec`` (the one schema)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.plumbing import ResolvedComponent
from rest_framework import serializers

from builder.configs.models import Config, ConfigVersion, HardwareCalibration, VersionSource
from builder.configs.services import parse_spec
from builder.core.errors import Refusal
from builder.core.parsers import BoundedJSONField
from builder.core.profiles import hardware_profile
from workers.engine.hardware import PROFILES
from workers.engine.spec import Spec


class SpecJSON(BoundedJSONField):
    """A spec as JSON, passed on as given (the caller validates it). The schema publishes it as the ``Spec``
    component: the spec's own JSON Schema (``SpecFieldExtension``)."""


class SpecField(SpecJSON):
    """A spec as JSON, validated into a ``Spec``. Errors are keyed by the field path inside the spec, so the
    API reports ``spec.model.moe.top_k``; a spec that breaks only rules between its fields is refused with 422
    (``parse_spec``), the whole request with it."""

    def to_internal_value(self, data: Any) -> Any:  # a Spec
        raw = super().to_internal_value(data)
        try:
            return parse_spec(raw)
        except Refusal as exc:
            if exc.status != 400:
                prefix = self.field_name or "spec"
                raise Refusal.of(
                    ((f"{prefix}.{e.path}" if e.path else prefix, e.message) for e in exc.errors), exc.status
                ) from None
            # DRF files a field's problems under the field's name only when they come as a ValidationError.
            raise serializers.ValidationError(exc.by_field()) from None


def spec_components() -> dict[str, dict[str, Any]]:
    """The spec's JSON Schema as OpenAPI components: ``Spec`` and one per section (pydantic's ``$defs``)."""
    schema = Spec.model_json_schema(ref_template="#/components/schemas/{model}")
    sections = schema.pop("$defs", {})
    return {"Spec": schema, **sections}


class SpecFieldExtension(OpenApiSerializerFieldExtension):
    """Publishes ``SpecJSON`` fields as a reference to the ``Spec`` component, registered with its sections."""

    target_class = SpecJSON
    match_subclasses = True

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        for name, schema in spec_components().items():
            component = ResolvedComponent(name=name, type=ResolvedComponent.SCHEMA, object=name, schema=schema)
            auto_schema.registry.register_on_missing(component)
        return {"$ref": "#/components/schemas/Spec"}

    def to_representation(self, value: Any) -> Any:
        return value.model_dump(mode="json") if isinstance(value, Spec) else value


class VersionSerializer(serializers.ModelSerializer[ConfigVersion]):
    class Meta:
        model = ConfigVersion
        fields = ["id", "number", "spec", "note", "source", "created_at"]
        read_only_fields = fields


class VersionSummarySerializer(serializers.ModelSerializer[ConfigVersion]):
    class Meta:
        model = ConfigVersion
        fields = ["id", "number", "note", "source", "created_at"]
        read_only_fields = fields


class ConfigSerializer(serializers.ModelSerializer[Config]):
    latest_version = serializers.SerializerMethodField(help_text="Number of the newest version.")
    versions = serializers.SerializerMethodField(help_text="How many versions exist.")
    spec = serializers.SerializerMethodField(help_text="The newest version's spec.")

    class Meta:
        model = Config
        fields = ["id", "name", "description", "created_at", "updated_at", "latest_version", "versions", "spec"]
        read_only_fields = fields

    def get_latest_version(self, config: Config) -> int:
        return config.latest.number

    def get_versions(self, config: Config) -> int:
        return config.versions.count()

    def get_spec(self, config: Config) -> dict[str, Any]:
        spec: dict[str, Any] = config.latest.spec
        return spec


SOURCE = serializers.ChoiceField(
    choices=VersionSource.choices,
    default=VersionSource.API,
    help_text="Where the version was made (shown in its history).",
)


class ConfigCreateSerializer(serializers.Serializer[dict[str, Any]]):
    name = serializers.CharField(max_length=200)
    description = serializers.CharField(max_length=5000, required=False, allow_blank=True, default="")
    spec = SpecField(help_text="A spec (see GET /api/specs/schema); omitted fields take their defaults.")
    note = serializers.CharField(max_length=300, required=False, allow_blank=True, default="")
    source = SOURCE  # type: ignore[assignment]  # a declared field: DRF pops it from the class


class ConfigUpdateSerializer(serializers.Serializer[dict[str, Any]]):
    """Metadata changes keep the versions; a ``spec`` makes a new version (every save is a version)."""

    name = serializers.CharField(max_length=200, required=False)
    description = serializers.CharField(max_length=5000, required=False, allow_blank=True)
    spec = SpecField(required=False)
    note = serializers.CharField(max_length=300, required=False, allow_blank=True, default="")


class VersionCreateSerializer(serializers.Serializer[dict[str, Any]]):
    spec = SpecField()
    note = serializers.CharField(max_length=300, required=False, allow_blank=True, default="")
    source = SOURCE  # type: ignore[assignment]  # a declared field: DRF pops it from the class


class FieldChangeSerializer(serializers.Serializer[dict[str, Any]]):
    path = serializers.CharField()
    before = serializers.JSONField(allow_null=True)
    after = serializers.JSONField(allow_null=True)


class DiffSerializer(serializers.Serializer[dict[str, Any]]):
    a = serializers.IntegerField()
    b = serializers.IntegerField()
    changes = FieldChangeSerializer(many=True)


class SpecRequestSerializer(serializers.Serializer[dict[str, Any]]):
    spec = BoundedJSONField(allow_null=True, help_text="The spec to check (any JSON: errors are reported, not raised).")
    hardware = serializers.ChoiceField(choices=list(PROFILES), required=False, help_text="Profile for advice.")
    num_gpus = serializers.IntegerField(min_value=1, max_value=64, default=1)


class AdviceSerializer(serializers.Serializer[dict[str, Any]]):
    code = serializers.CharField()
    severity = serializers.ChoiceField(choices=["warning", "info"])
    path = serializers.CharField()
    message = serializers.CharField(help_text="What is wrong and why.")
    fix = serializers.CharField(help_text="What to change.")
    patch = serializers.DictField(help_text="Dotted path -> suggested value, when one value fixes it.")


class EstimateRequestSerializer(serializers.Serializer[dict[str, Any]]):
    spec = SpecField()
    hardware = serializers.ChoiceField(choices=list(PROFILES), default="cpu")
    num_gpus = serializers.IntegerField(
        min_value=1,
        max_value=64,
        required=False,
        help_text="Devices to estimate on; default: the spec's training.distributed.devices (what its job runs on).",
    )
    parallelism = serializers.ChoiceField(
        choices=["ddp", "expert", "fsdp"],
        required=False,
        help_text="ddp: every GPU holds every expert; expert: routed experts sharded over the GPUs; fsdp: parameters, "
        "gradients and optimizer state sharded over the GPUs. Default: the layout the spec's training.distributed "
        "asks for.",
    )
    dataset_tokens = serializers.IntegerField(
        min_value=1, required=False, allow_null=True, help_text="Tokens in the training data, for data advice."
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        profile = hardware_profile(attrs["hardware"])
        # Each value is well-formed; together they are not (the rule is the profile's): 422.
        if "num_gpus" in attrs and attrs["num_gpus"] > profile.max_devices:
            raise Refusal("num_gpus", f"{profile.name} allows at most {profile.max_devices}", 422)
        devices = attrs["spec"].training.distributed.devices
        if "num_gpus" not in attrs and devices > profile.max_devices:
            raise Refusal(
                "spec.training.distributed.devices",
                f"the spec asks for {devices} devices; {profile.name} allows at most {profile.max_devices} "
                "(give num_gpus to estimate on fewer)",
                422,
            )
        return attrs


class EstimateResponseSerializer(serializers.Serializer[dict[str, Any]]):
    estimate = serializers.DictField(
        help_text="parameters, flops, memory (bytes by component, peak, worst case), memory_table, time, risk "
        "(level fits/tight/will_not_fit, fixes), data"
    )
    warnings = AdviceSerializer(many=True)


class TemplateSerializer(serializers.Serializer[dict[str, Any]]):
    name = serializers.CharField()
    title = serializers.CharField()
    description = serializers.CharField()
    why = serializers.CharField(allow_blank=True, help_text="The measurements behind its settings (may be empty).")
    task = serializers.ChoiceField(choices=["generation", "classification"])
    hardware = serializers.CharField()
    num_gpus = serializers.IntegerField()
    dataset = serializers.CharField(allow_null=True)
    spec = serializers.JSONField()


class HardwareSerializer(serializers.Serializer[dict[str, Any]]):
    key = serializers.CharField()
    name = serializers.CharField()
    kind = serializers.CharField()
    memory_bytes = serializers.IntegerField()
    bandwidth_bytes_per_s = serializers.FloatField()
    peak_flops = serializers.DictField()
    efficiency = serializers.FloatField()
    layer_overhead_seconds = serializers.FloatField(help_text="Dispatch time of one small MoE block's step.")
    notes = serializers.CharField(help_text="Where the figures come from (the CPU's: measured by its workers).")
    max_devices = serializers.IntegerField()
    calibration_factor = serializers.FloatField(help_text="Measured / predicted step time (1.0: uncalibrated).")


class CalibrationSerializer(serializers.ModelSerializer[HardwareCalibration]):
    class Meta:
        model = HardwareCalibration
        fields = [
            "id", "state", "steps", "hardware", "device_name", "measured_step_seconds", "predicted_step_seconds",
            "factor", "error", "created_at", "finished_at", "spec",
        ]  # fmt: skip
        read_only_fields = fields


class CalibrationCreateSerializer(serializers.Serializer[dict[str, Any]]):
    spec = SpecField(required=False, help_text="The spec to time; default: the tiny CPU demo template.")
    steps = serializers.IntegerField(min_value=1, max_value=50, default=5)
