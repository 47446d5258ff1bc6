"""Datasets API: list, upload (chunked sessions or one multipart request), inspect, clean, re-analyse, download.

Chunked upload (what the browser does; any client can)::

    POST   /api/datasets/uploads                {filename, size, text_field, label_field, format?, name?}
    PUT    /api/datasets/uploads/<id>?offset=N  raw bytes (Content-Type: application/octet-stream), ≤ chunk_size
    GET    /api/datasets/uploads/<id>           {received, ...}: where to resume after a lost response
    POST   /api/datasets/uploads/<id>/complete  → 202, the dataset (state "queued": a worker validates it)

Other datasets are invisible: another user's dataset or upload answers 404 on every endpoint.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import Http404
from django.http.response import HttpResponseBase
from django.urls import path
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builder.accounts import audit
from builder.accounts.models import AuditAction
from builder.core.errors import NON_FIELD, Refusal
from builder.core.parsers import MAX_DB_INT, BoundedJSONParser
from builder.datasets import services, storage, uploads
from builder.datasets.models import Dataset
from builder.datasets.serializers import (
    DatasetListSerializer,
    DatasetSerializer,
    FieldsUpdateSerializer,
    QuotaSerializer,
    SimpleUploadSerializer,
    UploadSessionSerializer,
    UploadStartSerializer,
    cleaning_request_schema,
    parse_cleaning_options,
)


def _detail(dataset: Dataset, code: int = status.HTTP_200_OK) -> Response:
    return Response(DatasetSerializer(dataset).data, status=code)


class DatasetListView(APIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(responses=DatasetListSerializer(many=True), summary="Your datasets and the built-in ones")
    def get(self, request: Request) -> Response:
        # The list leaves out the bulky JSON columns: do not load them either.
        visible = services.visible_datasets(request.user).select_related("owner").defer("stats", "cleaning_report")
        datasets = visible[:500]
        return Response(DatasetListSerializer(datasets, many=True).data)

    @extend_schema(
        request={"multipart/form-data": SimpleUploadSerializer},
        responses={202: DatasetSerializer},
        summary="Upload a small file in one request (larger files: upload sessions)",
    )
    def post(self, request: Request) -> Response:
        # Refuse an oversized body before parsing it (the multipart overhead is a few hundred bytes).
        length = request.META.get("CONTENT_LENGTH") or ""
        if length.isdigit() and int(length) > settings.DATASET_SIMPLE_UPLOAD_MAX_BYTES + 64 * 1024:
            raise Refusal("file", uploads.SIMPLE_UPLOAD_TOO_LARGE, 413)
        serializer = SimpleUploadSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        dataset = uploads.simple_upload(request.user, data.pop("file"), data)
        return _detail(dataset, status.HTTP_202_ACCEPTED)


class DatasetDetailView(APIView):
    @extend_schema(responses=DatasetSerializer, summary="One dataset, with its statistics and cleaning report")
    def get(self, request: Request, dataset_id: int) -> Response:
        return _detail(services.get_visible_dataset(request.user, dataset_id))

    @extend_schema(
        request=FieldsUpdateSerializer,
        responses=DatasetSerializer,
        summary="Rename, or read an uploaded dataset with other text/label fields (validation runs again)",
    )
    def patch(self, request: Request, dataset_id: int) -> Response:
        dataset = services.get_visible_dataset(request.user, dataset_id)
        serializer = FieldsUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        services.require_owner(request.user, dataset, "changed")
        renamed = {k: data[k] for k in ("name", "description") if k in data}
        if renamed:
            Dataset.objects.filter(pk=dataset.pk).update(**renamed)
            dataset.refresh_from_db()
        if "text_field" in data or "label_field" in data:
            dataset = services.update_fields(
                dataset, data.get("text_field", dataset.text_field), data.get("label_field", dataset.label_field)
            )
        return _detail(dataset)

    @extend_schema(responses={204: None}, summary="Delete a dataset and its files")
    def delete(self, request: Request, dataset_id: int) -> Response:
        dataset = services.get_visible_dataset(request.user, dataset_id)
        services.require_owner(request.user, dataset, "deleted")
        target = audit.Target.of(dataset)
        services.delete_dataset(dataset)
        audit.record(request, AuditAction.DELETION, target)
        return Response(status=status.HTTP_204_NO_CONTENT)


class DatasetCleanView(APIView):
    parser_classes = [BoundedJSONParser]

    @extend_schema(
        request={"application/json": cleaning_request_schema()},
        responses={202: DatasetSerializer},
        summary="Clean into a new version",
        description=(
            "Body: the cleaning options, all optional (unicode_form NFC|NFKC|none, normalize_whitespace, lowercase, "
            "min_chars, max_chars, drop_exact_duplicates, drop_near_duplicates, near_duplicate_threshold, "
            "val_fraction, seed), plus an optional name for the new version. Built-in datasets can be cleaned "
            "too: the new version is yours."
        ),
    )
    def post(self, request: Request, dataset_id: int) -> Response:
        source = services.get_visible_dataset(request.user, dataset_id)
        if not isinstance(request.data, dict):
            raise Refusal(NON_FIELD, "send a JSON object of cleaning options")
        raw = dict(request.data)
        name = raw.pop("name", "") or ""
        if not isinstance(name, str) or len(name) > 200:
            raise Refusal("name", "a text of at most 200 characters")
        options = parse_cleaning_options(raw)
        dataset = services.start_cleaning(request.user, source, options, name)
        return _detail(dataset, status.HTTP_202_ACCEPTED)


class DatasetAnalyzeView(APIView):
    @extend_schema(request=None, responses={202: DatasetSerializer}, summary="Compute the statistics again")
    def post(self, request: Request, dataset_id: int) -> Response:
        dataset = services.get_visible_dataset(request.user, dataset_id)
        services.require_owner(request.user, dataset, "re-analysed")
        dataset = services.start_analysis(dataset)
        return _detail(dataset, status.HTTP_202_ACCEPTED)


class DatasetDownloadView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("part", str, description="data (default), train or validation")],
        # The file's own type (storage.CONTENT_TYPES: by the dataset's format).
        responses={
            **{(200, content_type): OpenApiTypes.BINARY for content_type in storage.CONTENT_TYPES.values()},
            302: None,
        },
        summary="Download a dataset's file (S3: a redirect to a presigned URL that expires in minutes)",
    )
    def get(self, request: Request, dataset_id: int) -> HttpResponseBase:
        dataset = services.get_visible_dataset(request.user, dataset_id)
        return download(request, dataset, request.query_params.get("part", ""))


def download(request: Any, dataset: Dataset, part: str) -> HttpResponseBase:
    """The file of ``part`` (default: the only part, or train); 404 for a part the dataset does not have. The
    download is in the audit log (of the downloader, and of the owner)."""
    parts = dataset.parts
    part = part or next(iter(parts), "")
    if part not in parts:
        raise Http404(f"this dataset has no part {part!r}" if part else "this dataset has no file")
    audit.record(request, AuditAction.DOWNLOAD, dataset, part=part)
    stem = dataset.original_filename.rsplit(".", 1)[0] if dataset.original_filename else f"dataset-{dataset.pk}"
    suffix = "jsonl" if dataset.format == "jsonl" else dataset.format
    filename = f"{stem}.{suffix}" if part == "data" else f"{stem}-v{dataset.version}-{part}.{suffix}"
    return storage.download_response(parts[part], filename, storage.CONTENT_TYPES.get(dataset.format, "text/plain"))


class QuotaView(APIView):
    @extend_schema(responses=QuotaSerializer, summary="Your storage use and the upload limits")
    def get(self, request: Request) -> Response:
        report = {
            **services.quota_report(request.user),
            "max_upload_bytes": settings.DATASET_MAX_UPLOAD_BYTES,
            "chunk_size": settings.DATASET_UPLOAD_CHUNK_BYTES,
        }
        return Response(QuotaSerializer(report).data)


class UploadStartView(APIView):
    parser_classes = [BoundedJSONParser]

    @extend_schema(
        request=UploadStartSerializer, responses={201: UploadSessionSerializer}, summary="Start a chunked upload"
    )
    def post(self, request: Request) -> Response:
        serializer = UploadStartSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        session = uploads.create_session(request.user, serializer.validated_data)
        return Response(UploadSessionSerializer(session).data, status=status.HTTP_201_CREATED)


class UploadSessionView(APIView):
    # The chunk is read from the raw request stream; no parser ever buffers it.
    parser_classes: list[Any] = []

    @extend_schema(responses=UploadSessionSerializer, summary="An upload's progress (where to resume)")
    def get(self, request: Request, session_id: str) -> Response:
        return Response(UploadSessionSerializer(uploads.get_own_session(request.user, session_id)).data)

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "offset",
                {"type": "integer", "minimum": 0, "maximum": MAX_DB_INT},
                required=True,
                description="Byte offset of this chunk: where the upload stands (its `received`).",
            )
        ],
        request={"application/octet-stream": {"type": "string", "format": "binary", "minLength": 1}},
        responses=UploadSessionSerializer,
        summary="Send the next chunk",
    )
    def put(self, request: Request, session_id: str) -> Response:
        session = uploads.get_own_session(request.user, session_id)
        raw_offset = request.query_params.get("offset", "")
        if not raw_offset.isdigit():
            raise Refusal("offset", "a byte offset (a non-negative integer) is required")
        raw_length = request.META.get("CONTENT_LENGTH") or ""
        if not raw_length.isdigit():
            raise Refusal("", "a Content-Length header is required", status.HTTP_411_LENGTH_REQUIRED)
        django_request = request._request  # the raw stream, untouched by any parser
        session = uploads.append_chunk(session, int(raw_offset), int(raw_length), django_request.read)
        return Response(UploadSessionSerializer(session).data)

    @extend_schema(responses={204: None}, summary="Abandon an upload (frees its reserved quota)")
    def delete(self, request: Request, session_id: str) -> Response:
        session = uploads.get_own_session(request.user, session_id)
        uploads.abort_session(session)
        return Response(status=status.HTTP_204_NO_CONTENT)


class UploadCompleteView(APIView):
    @extend_schema(request=None, responses={202: DatasetSerializer}, summary="Finish an upload: validation starts")
    def post(self, request: Request, session_id: str) -> Response:
        session = uploads.get_own_session(request.user, session_id)
        dataset = uploads.complete_session(session)
        return _detail(dataset, status.HTTP_202_ACCEPTED)


urlpatterns = [
    path("datasets", DatasetListView.as_view(), name="api-datasets"),
    path("datasets/quota", QuotaView.as_view(), name="api-datasets-quota"),
    path("datasets/uploads", UploadStartView.as_view(), name="api-dataset-uploads"),
    path("datasets/uploads/<str:session_id>", UploadSessionView.as_view(), name="api-dataset-upload"),
    path(
        "datasets/uploads/<str:session_id>/complete", UploadCompleteView.as_view(), name="api-dataset-upload-complete"
    ),
    path("datasets/<int:dataset_id>", DatasetDetailView.as_view(), name="api-dataset"),
    path("datasets/<int:dataset_id>/clean", DatasetCleanView.as_view(), name="api-dataset-clean"),
    path("datasets/<int:dataset_id>/analyze", DatasetAnalyzeView.as_view(), name="api-dataset-analyze"),
    path("datasets/<int:dataset_id>/download", DatasetDownloadView.as_view(), name="api-dataset-download"),
]
