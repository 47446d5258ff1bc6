"""Reports API: request an evaluation, list and inspect reports, download their formats and the model's artifacts.

    GET  /api/reports                       reports of the jobs you may see (?job=<id>, ?state=)
    GET  /api/reports/schema                the JSON Schema of report.json
    GET  /api/reports/<id>                  one report: state, headline metrics, links to every download
    GET  /api/reports/<id>/report.<fmt>     fmt = json | pdf | md | html (rendered by the worker, stored)
    GET  /api/reports/<id>/artifacts/<name> model.safetensors | tokenizer.json | model.onnx | spec.json
    GET  /api/jobs/<id>/reports             the job's reports
    POST /api/jobs/<id>/reports             evaluate the job's last checkpoint (or {"step": N}); owner only

Every download answers from local storage, or redirects to a presigned URL when storage is S3. A report is visible
to whoever may see its job; for anyone else every endpoint is a 404.
"""

from __future__ import annotations

from django.http import Http404, JsonResponse
from django.http.response import HttpResponseBase
from django.urls import path
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builder.accounts import audit
from builder.accounts.models import AuditAction
from builder.core.durable import WorkState
from builder.core.errors import Refusal
from builder.core.parsers import MAX_DB_INT, db_int
from builder.datasets.storage import download_response
from builder.jobs.access import can_control, get_visible_job
from builder.reports.models import Report
from builder.reports.schema import REPORT_SCHEMA
from builder.reports.serializers import ARTIFACT_FILES, REPORT_FILES, ReportRequestSerializer, ReportSerializer
from builder.reports.services import get_visible_report, request_report, visible_reports

LIST_LIMIT = 500


def _int_query(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    value = db_int(raw)
    if value is None:
        raise ValidationError({name: [f"must be an integer from 1 to {MAX_DB_INT}"]})
    return value


class ReportListView(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter(
                "job", {"type": "integer", "minimum": 1, "maximum": MAX_DB_INT}, description="Only this job's reports."
            ),
            OpenApiParameter("state", str, enum=WorkState.values, description="Only reports in this state."),
        ],
        responses=ReportSerializer(many=True),
        summary="Reports of the jobs you own or that are shared with you, newest first",
    )
    def get(self, request: Request) -> Response:
        reports = visible_reports(request.user).select_related("job", "job__owner")
        job = _int_query(request, "job")
        if job is not None:
            reports = reports.filter(job_id=job)
        state = request.query_params.get("state")
        if state is not None:
            if state not in WorkState.values:
                raise ValidationError({"state": [f"must be one of {', '.join(WorkState.values)}"]})
            reports = reports.filter(state=state)
        return Response(ReportSerializer(reports.defer("figures")[:LIST_LIMIT], many=True).data)


class JobReportsView(APIView):
    @extend_schema(responses=ReportSerializer(many=True), summary="The reports of one job")
    def get(self, request: Request, job_id: int) -> Response:
        job = get_visible_job(request.user, job_id)
        reports = Report.objects.filter(job=job).select_related("job", "job__owner").defer("figures")
        return Response(ReportSerializer(reports, many=True).data)

    @extend_schema(
        request=ReportRequestSerializer,
        responses={
            201: OpenApiResponse(ReportSerializer, description="A new report, queued."),
            200: OpenApiResponse(ReportSerializer, description="The checkpoint's report already existed (a failed "
                                 "one is queued again)."),
            409: OpenApiResponse(OpenApiTypes.OBJECT, description="The job is active or has no checkpoint."),
        },
        summary="Evaluate a stopped job's checkpoint",
        description="Runs the evaluation, the exports and the latency measurements on a worker of the job's "
        "queue. One report per checkpoint: asking again returns it. Only the job's owner may ask.",
    )  # fmt: skip
    def post(self, request: Request, job_id: int) -> Response:
        job = get_visible_job(request.user, job_id)
        if not can_control(request.user, job):
            raise Refusal("", "only the job's owner can request its evaluation", status.HTTP_403_FORBIDDEN)
        serializer = ReportRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        outcome = request_report(job, user=request.user, step=serializer.validated_data.get("step"))
        code = status.HTTP_201_CREATED if outcome.created else status.HTTP_200_OK
        return Response(ReportSerializer(outcome.report).data, status=code)


class ReportDetailView(APIView):
    @extend_schema(responses=ReportSerializer, summary="One report")
    def get(self, request: Request, report_id: int) -> Response:
        return Response(ReportSerializer(get_visible_report(request.user, report_id)).data)


class ReportSchemaView(APIView):
    @extend_schema(
        responses={(200, "application/schema+json"): OpenApiTypes.OBJECT},
        summary="The JSON Schema (draft 2020-12) of report.json",
    )
    def get(self, request: Request) -> JsonResponse:
        response = JsonResponse(REPORT_SCHEMA, json_dumps_params={"indent": 2})
        response["Content-Type"] = "application/schema+json"
        return response


def _stored_download(request: Request, report: Report, name: str, content_type: str) -> HttpResponseBase:
    stored = report.artifacts.get(name) if report.state == WorkState.SUCCEEDED else None
    if not stored:
        raise Http404(f"report {report.pk} is {report.state}: its files exist once it succeeds")
    filename = f"job-{report.job_id}-step-{report.checkpoint_step}-{name}"
    target = audit.Target(
        "report", report.pk, f"job {report.job_id} step {report.checkpoint_step}", report.job.owner_id
    )
    audit.record(request, AuditAction.DOWNLOAD, target, file=name)
    return download_response(stored["storage"], filename, content_type)


class ReportFileView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("name", str, OpenApiParameter.PATH, enum=list(REPORT_FILES))],
        responses={
            (200, "application/json"): OpenApiTypes.OBJECT,
            (200, "application/pdf"): OpenApiTypes.BINARY,
            (200, "text/markdown"): OpenApiTypes.STR,
            (200, "text/html"): OpenApiTypes.STR,
            302: OpenApiResponse(description="S3 storage: a redirect to a presigned URL of the file."),
        },
        summary="The report as JSON (see /api/reports/schema), PDF, Markdown or one HTML file",
        operation_id="reports_file_retrieve",
    )
    def get(self, request: Request, report_id: int, name: str) -> HttpResponseBase:
        report = get_visible_report(request.user, report_id)
        if name not in REPORT_FILES:
            raise Http404(f"no such format; choose one of {', '.join(REPORT_FILES)}")
        return _stored_download(request, report, name, REPORT_FILES[name][0])


class ReportArtifactView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("name", str, OpenApiParameter.PATH, enum=list(ARTIFACT_FILES))],
        responses={
            **{
                (200, content_type): OpenApiTypes.OBJECT if content_type == "application/json" else OpenApiTypes.BINARY
                for content_type, _ in ARTIFACT_FILES.values()
            },
            302: OpenApiResponse(description="S3 storage: a redirect to a presigned URL of the file."),
        },
        summary="A model artifact of the report's checkpoint: weights, tokenizer, ONNX model, spec",
        operation_id="reports_artifact_retrieve",
        description="TensorBoard logs are the job's: GET /api/jobs/<id>/tensorboard.tar.gz.",
    )
    def get(self, request: Request, report_id: int, name: str) -> HttpResponseBase:
        report = get_visible_report(request.user, report_id)
        if name not in ARTIFACT_FILES:
            raise Http404(f"no such artifact; choose one of {', '.join(ARTIFACT_FILES)}")
        return _stored_download(request, report, name, ARTIFACT_FILES[name][0])


urlpatterns = [
    path("reports", ReportListView.as_view(), name="api-reports"),
    path("reports/schema", ReportSchemaView.as_view(), name="api-report-schema"),
    path("reports/<int:report_id>", ReportDetailView.as_view(), name="api-report"),
    path("reports/<int:report_id>/<str:name>", ReportFileView.as_view(), name="api-report-file"),
    path("reports/<int:report_id>/artifacts/<str:name>", ReportArtifactView.as_view(), name="api-report-artifact"),
    path("jobs/<int:job_id>/reports", JobReportsView.as_view(), name="api-job-reports"),
]
