"""Jobs API: submit, list, inspect, cancel, resume; the metric record and events; downloads."""

from __future__ import annotations

import io
import tarfile
from typing import Any

from django.http import FileResponse, StreamingHttpResponse
from django.urls import path
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builder.accounts import audit
from builder.accounts.models import AuditAction
from builder.core.errors import Refusal, validated
from builder.core.parsers import MAX_DB_INT
from builder.jobs import history, lifecycle, remote
from builder.jobs.access import can_control, get_visible_job, visible_jobs
from builder.jobs.files import job_layout
from builder.jobs.models import JobEvent
from builder.jobs.serializers import JobCreateSerializer, JobSerializer, MetricsPageSerializer
from builder.jobs.submit import resume_job, submit_job
from builder.jobs.throttling import SubmissionThrottle

# The bounds ``_int_param`` enforces, published so that a client knows them.
NON_NEGATIVE = {"type": "integer", "minimum": 0, "maximum": MAX_DB_INT}
LIMIT = {"type": "integer", "minimum": 1, "maximum": 100000}


def _int_param(request: Request, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError({name: ["must be an integer"]}) from None
    maximum = MAX_DB_INT if maximum is None else maximum  # beyond it no row can match (SQLite would overflow)
    if value < minimum or value > maximum:
        raise ValidationError({name: [f"must be between {minimum} and {maximum}"]})
    return value


class JobListView(APIView):
    def get_throttles(self) -> list[Any]:
        # Submissions are limited; reading the list is not.
        return [SubmissionThrottle()] if self.request.method == "POST" else super().get_throttles()

    @extend_schema(responses=JobSerializer(many=True), summary="Jobs you own or that are shared with you")
    def get(self, request: Request) -> Response:
        jobs = visible_jobs(request.user).select_related("owner")[:200]
        return Response(JobSerializer(jobs, many=True).data)

    @extend_schema(
        request=JobCreateSerializer,
        responses={201: JobSerializer},
        summary="Submit a training job",
        description="The job is queued on `gpu` (default) or `cpu` and dispatched once it is stored. 400 names the "
        "field at fault; `non_field_errors` when you already have JOBS_MAX_ACTIVE_PER_USER active jobs. 429 (with "
        "Retry-After) past the submission rate (JOB_SUBMISSION_RATE, per user).",
    )
    def post(self, request: Request) -> Response:
        serializer = JobCreateSerializer(data=request.data, context={"request": request})
        validated(serializer)  # 422 when only ids naming nothing of yours (or other unstated rules) are at fault
        job = submit_job(request.user, serializer.submission())
        audit.record(request, AuditAction.JOB_LAUNCHED, job, queue=job.queue)
        return Response(JobSerializer(job).data, status=status.HTTP_201_CREATED)


class JobDetailView(APIView):
    @extend_schema(responses=JobSerializer, summary="One job")
    def get(self, request: Request, job_id: int) -> Response:
        return Response(JobSerializer(get_visible_job(request.user, job_id)).data)


class JobControlView(APIView):
    action: str = ""

    @extend_schema(request=None, responses=JobSerializer)
    def post(self, request: Request, job_id: int) -> Response:
        job = get_visible_job(request.user, job_id)
        if not can_control(request.user, job):
            raise Refusal("", "only the owner can control this job", status.HTTP_403_FORBIDDEN)
        # A refusal is a 409 with the job's state (``{"detail", "state"}``): it already ended, cannot resume, or
        # resuming it would pass the owner's limit of active jobs.
        if self.action == "cancel":
            lifecycle.request_cancel(job)
        else:
            resume_job(job)
        job.refresh_from_db()
        return Response(JobSerializer(job).data)


class JobMetricsView(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("after", NON_NEGATIVE, description="Return points with a sequence number above this."),
            OpenApiParameter("limit", LIMIT, description="At most this many points (default 10000)."),
        ],
        responses=MetricsPageSerializer,
        summary="The metric record after a sequence number (for gap recovery and exports)",
    )
    def get(self, request: Request, job_id: int) -> Response:
        job = get_visible_job(request.user, job_id)
        after = _int_param(request, "after", 0)
        limit = _int_param(request, "limit", 10000, minimum=1, maximum=100000)
        points = history.points_after(job, after, limit)
        return Response({"after": after, "next_after": points[-1][0] if points else after, "points": points})


class JobEventsView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("after", NON_NEGATIVE, description="Events with a sequence number above this.")],
        responses=OpenApiTypes.OBJECT,
        summary="The job's events: state changes, checkpoints, interventions, anomalies",
    )
    def get(self, request: Request, job_id: int) -> Response:
        job = get_visible_job(request.user, job_id)
        after = _int_param(request, "after", 0)
        events = JobEvent.objects.filter(job=job, seq__gt=after).order_by("seq")[:5000]
        return Response({"events": [lifecycle.event_payload(e) for e in events]})


class JobMetricsCsvView(APIView):
    @extend_schema(responses={(200, "text/csv"): OpenApiTypes.STR}, summary="The metric record as CSV")
    def get(self, request: Request, job_id: int) -> StreamingHttpResponse:
        job = get_visible_job(request.user, job_id)
        audit.record(request, AuditAction.DOWNLOAD, job, file="metrics.csv")
        response = StreamingHttpResponse(history.csv_rows(job), content_type="text/csv")
        response["Content-Disposition"] = f'attachment; filename="job-{job.pk}-metrics.csv"'
        return response


class JobTensorBoardView(APIView):
    @extend_schema(
        responses={(200, "application/gzip"): OpenApiTypes.BINARY}, summary="The TensorBoard log folder (tar.gz)"
    )
    def get(self, request: Request, job_id: int) -> Any:
        job = get_visible_job(request.user, job_id)
        if remote.is_mirrored():
            # Remote storage: the events stored at the job's last checkpoint (or its end), streamed from storage.
            names = remote.tensorboard_files(job.pk)
            if not names:
                return Response({"detail": "this job has no TensorBoard logs yet"}, status=status.HTTP_404_NOT_FOUND)
            audit.record(request, AuditAction.DOWNLOAD, job, file="tensorboard.tar.gz")
            archive_name = f"job-{job.pk}-tensorboard"
            response = StreamingHttpResponse(
                remote.off_the_event_loop(remote.tensorboard_archive(job.pk, names, archive_name)),
                content_type="application/gzip",
            )
            response["Content-Disposition"] = f'attachment; filename="{archive_name}.tar.gz"'
            return response
        folder = job_layout(job.pk).tensorboard
        if not folder.is_dir():
            return Response({"detail": "this job has no TensorBoard logs yet"}, status=status.HTTP_404_NOT_FOUND)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            archive.add(folder, arcname=f"job-{job.pk}-tensorboard")
        buffer.seek(0)
        audit.record(request, AuditAction.DOWNLOAD, job, file="tensorboard.tar.gz")
        return FileResponse(buffer, as_attachment=True, filename=f"job-{job.pk}-tensorboard.tar.gz")


urlpatterns = [
    path("jobs", JobListView.as_view(), name="api-jobs"),
    path("jobs/<int:job_id>", JobDetailView.as_view(), name="api-job"),
    path("jobs/<int:job_id>/cancel", JobControlView.as_view(action="cancel"), name="api-job-cancel"),
    path("jobs/<int:job_id>/resume", JobControlView.as_view(action="resume"), name="api-job-resume"),
    path("jobs/<int:job_id>/metrics", JobMetricsView.as_view(), name="api-job-metrics"),
    path("jobs/<int:job_id>/metrics.csv", JobMetricsCsvView.as_view(), name="api-job-metrics-csv"),
    path("jobs/<int:job_id>/events", JobEventsView.as_view(), name="api-job-events"),
    path("jobs/<int:job_id>/tensorboard.tar.gz", JobTensorBoardView.as_view(), name="api-job-tensorboard"),
]
