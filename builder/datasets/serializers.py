"""What the datasets API reads and returns."""

from __future__ import annotations

from typing import Any, cast

from django.conf import settings
from django.urls import reverse
from pydantic import ValidationError as PydanticValidationError
from rest_framework import serializers

from builder.core.errors import Refusal
from builder.datasets.cleaning import CleaningOptions
from builder.datasets.models import DataFormat, Dataset, UploadSession


class DatasetSerializer(serializers.ModelSerializer[Dataset]):
    owner = serializers.SerializerMethodField()
    builtin = serializers.BooleanField(source="is_builtin", read_only=True)
    error = serializers.SerializerMethodField()
    downloads = serializers.SerializerMethodField()
    page = serializers.SerializerMethodField()

    class Meta:
        model = Dataset
        fields = [
            "id", "name", "description", "owner", "builtin", "slug", "origin", "parent", "version",
            "format", "text_field", "label_field", "original_filename", "size_bytes", "sha256",
            "state", "progress", "phase", "error", "stats", "cleaning_options", "cleaning_report",
            "downloads", "page", "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = fields

    def get_owner(self, obj: Dataset) -> str | None:
        return obj.owner.get_username() if obj.owner else None

    def get_error(self, obj: Dataset) -> dict[str, Any] | None:
        if not obj.error_message:
            return None
        return {"line": obj.error_line, "message": obj.error_message}

    def get_downloads(self, obj: Dataset) -> dict[str, str]:
        """Part name → API URL (which answers with the file, or a redirect to a short-lived S3 URL)."""
        url = reverse("api-dataset-download", args=[obj.pk])
        return {part: f"{url}?part={part}" for part in obj.parts}

    def get_page(self, obj: Dataset) -> str:
        return reverse("datasets:detail", args=[obj.pk])


class DatasetListSerializer(DatasetSerializer):
    """The list leaves out the bulky statistics and reports (the detail has them)."""

    class Meta(DatasetSerializer.Meta):
        fields = [f for f in DatasetSerializer.Meta.fields if f not in ("stats", "cleaning_report")]
        read_only_fields = fields


class _FieldsMixin(serializers.Serializer[Any]):
    text_field = serializers.CharField(max_length=200, required=False, default="text", allow_blank=True)
    label_field = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)


# The upload's declared format; blank means "tell from the file name's extension". The same choice set as the
# model's (blank aside), so the OpenAPI schema names both DataFormatEnum.
UPLOAD_FORMAT_CHOICES = [("", "from the extension"), *DataFormat.choices]


class UploadStartSerializer(_FieldsMixin):
    filename = serializers.CharField(max_length=255)
    size = serializers.IntegerField(
        min_value=0, help_text="Exact size of the file in bytes (at most DATASET_MAX_UPLOAD_BYTES and your free quota)."
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The largest upload, published as the field's maximum (read when a request or the schema is made, so a
        # changed setting shows). Over it: 413, as before, now also a schema error a client can see beforehand.
        cast(serializers.IntegerField, self.fields["size"]).max_value = settings.DATASET_MAX_UPLOAD_BYTES

    name = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    description = serializers.CharField(max_length=5000, required=False, default="", allow_blank=True)
    format = serializers.ChoiceField(choices=UPLOAD_FORMAT_CHOICES, required=False, default="")


class SimpleUploadSerializer(_FieldsMixin):
    file = serializers.FileField()
    name = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    description = serializers.CharField(max_length=5000, required=False, default="", allow_blank=True)
    format = serializers.ChoiceField(choices=UPLOAD_FORMAT_CHOICES, required=False, default="")


class FieldsUpdateSerializer(_FieldsMixin):
    name = serializers.CharField(max_length=200, required=False)
    description = serializers.CharField(max_length=5000, required=False, allow_blank=True)
    text_field = serializers.CharField(max_length=200, required=False, allow_blank=True)
    label_field = serializers.CharField(max_length=200, required=False, allow_blank=True)


class UploadSessionSerializer(serializers.ModelSerializer[UploadSession]):
    chunk_size = serializers.SerializerMethodField()
    complete = serializers.SerializerMethodField()
    upload_url = serializers.SerializerMethodField()

    class Meta:
        model = UploadSession
        fields = [
            "id", "name", "filename", "format", "text_field", "label_field", "size", "received", "chunk_size",
            "complete", "dataset", "upload_url", "created_at",
        ]  # fmt: skip
        read_only_fields = fields

    def get_chunk_size(self, obj: UploadSession) -> int:
        return int(settings.DATASET_UPLOAD_CHUNK_BYTES)

    def get_complete(self, obj: UploadSession) -> bool:
        return not obj.is_open

    def get_upload_url(self, obj: UploadSession) -> str:
        return reverse("api-dataset-upload", args=[obj.pk])


def parse_cleaning_options(raw: dict[str, Any]) -> CleaningOptions:
    """``CleaningOptions`` from user input, or a DRF ``ValidationError`` keyed by option name."""
    try:
        return CleaningOptions.model_validate(raw)
    except PydanticValidationError as exc:
        problems = [(".".join(str(p) for p in err["loc"]), err["msg"]) for err in exc.errors(include_url=False)]
        # A rule between options (max_chars below min_chars) is not in the published schema: 422, not 400.
        between_fields = all(err["type"] == "value_error" for err in exc.errors())
        raise Refusal.of(problems, 422 if between_fields else 400) from None


def cleaning_request_schema() -> dict[str, Any]:
    """The clean endpoint's body as published: every option of ``CleaningOptions``, plus the new version's name."""
    schema = CleaningOptions.model_json_schema()
    schema["properties"]["name"] = {
        "type": "string",
        "maxLength": 200,
        "description": "Name of the new version (default: the source's name with the cleaning noted).",
    }
    schema.pop("title", None)
    return schema


class QuotaSerializer(serializers.Serializer[Any]):
    used_bytes = serializers.IntegerField()
    quota_bytes = serializers.IntegerField()
    free_bytes = serializers.IntegerField()
    max_upload_bytes = serializers.IntegerField()
    chunk_size = serializers.IntegerField()
