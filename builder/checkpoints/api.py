"""Imported checkpoints API: upload a Hugging Face folder a job can start from, list, inspect, delete.

    GET    /api/checkpoints        your imported checkpoints
    POST   /api/checkpoints        multipart: name, and the folder's files (config.json, model.safetensors,
                                   tokenizer.json ...) or one .zip of them; 201 with the derived spec
    GET    /api/checkpoints/<id>   one (its derived spec, family, files)
    DELETE /api/checkpoints/<id>   refused (409) while a job starts from it

A checkpoint is its owner's alone: for anyone else every address is a 404. A job starts from one with
``init_checkpoint`` (POST /api/jobs).
"""

from __future__ import annotations

from typing import Any

from django.urls import path
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builder.checkpoints.models import ImportedCheckpoint
from builder.checkpoints.services import delete_checkpoint, get_own_checkpoint, import_checkpoint, own_checkpoints


class CheckpointSerializer(serializers.ModelSerializer[ImportedCheckpoint]):
    files = serializers.SerializerMethodField(help_text="The folder's file names.")

    class Meta:
        model = ImportedCheckpoint
        fields = ["id", "name", "family", "architecture", "spec", "files", "size_bytes", "weights_sha256", "notes",
                  "created_at"]  # fmt: skip
        read_only_fields = fields

    def get_files(self, checkpoint: ImportedCheckpoint) -> list[str]:
        return sorted(checkpoint.files)


UPLOAD_REQUEST = inline_serializer(
    "CheckpointUpload",
    {
        "name": serializers.CharField(required=False, max_length=200),
        "files": serializers.ListField(
            child=serializers.FileField(),
            help_text="config.json + model.safetensors (+ tokenizer.json, tokenizer_config.json ...), or one .zip.",
        ),
    },
)


class CheckpointListView(APIView):
    parser_classes = [MultiPartParser]

    @extend_schema(responses=CheckpointSerializer(many=True), summary="Your imported checkpoints")
    def get(self, request: Request) -> Response:
        return Response(CheckpointSerializer(own_checkpoints(request.user), many=True).data)

    @extend_schema(
        request={"multipart/form-data": UPLOAD_REQUEST},
        responses={201: CheckpointSerializer},
        summary="Import a Hugging Face folder (DeepSeek-V3/V2, GLM-4-MoE or Qwen2-MoE) to start jobs from",
        description="JSON and safetensors only: any other file (a pickle, a .bin or .pt checkpoint) is refused by "
        "name. The spec is derived from config.json and validated; refusals name the config key, spec field, file "
        "or tensor at fault. Over CHECKPOINT_MAX_UPLOAD_BYTES: 413.",
    )
    def post(self, request: Request) -> Response:
        uploads: list[Any] = [f for key in request.FILES for f in request.FILES.getlist(key)]
        form: Any = request.data  # a QueryDict (multipart)
        name = str(form.get("name") or "")
        checkpoint = import_checkpoint(request.user, name, uploads)
        return Response(CheckpointSerializer(checkpoint).data, status=status.HTTP_201_CREATED)


class CheckpointDetailView(APIView):
    @extend_schema(responses=CheckpointSerializer, summary="One imported checkpoint")
    def get(self, request: Request, checkpoint_id: int) -> Response:
        return Response(CheckpointSerializer(get_own_checkpoint(request.user, checkpoint_id)).data)

    @extend_schema(responses={204: None}, summary="Delete an imported checkpoint no job starts from")
    def delete(self, request: Request, checkpoint_id: int) -> Response:
        delete_checkpoint(get_own_checkpoint(request.user, checkpoint_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


urlpatterns = [
    path("checkpoints", CheckpointListView.as_view(), name="api-checkpoints"),
    path("checkpoints/<int:checkpoint_id>", CheckpointDetailView.as_view(), name="api-checkpoint"),
]
