"""Fleet API: ``GET /api/hardware/classes`` (what a launch may choose) and ``GET /api/workers`` (the registry)."""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builder.core import hardware_classes
from builder.fleet import serializers as s
from builder.fleet.registry import rows_for


class HardwareClassListView(APIView):
    @extend_schema(
        responses=s.HardwareClassSerializer(many=True),
        summary="Hardware classes a job may train on",
        description="Each class is a Celery queue (QUEUE_HARDWARE): give its name as a launch's `queue`. A launch that "
        "asks for more devices than the class has (training.distributed.devices), or whose predicted peak memory "
        "does not fit a device, is refused with the estimate and the fix.",
    )
    def get(self, request: Request) -> Response:
        default = hardware_classes.default_class()
        live: dict[str, int] = {}
        for worker in rows_for(request.user):
            for queue in worker["queues"] if worker["state"] == "live" else ():
                live[queue] = live.get(queue, 0) + 1
        rows = [
            {**c.as_dict(), "default": c.name == default, "live_workers": live.get(c.name, 0)}
            for c in hardware_classes.classes().values()
        ]
        return Response(rows)


class WorkerListView(APIView):
    @extend_schema(
        responses=s.WorkerSerializer(many=True),
        summary="Workers, their hardware, current job and heartbeat",
        description='Another user\'s job is shown as `{"visible": false}`: neither its name nor its id.',
    )
    def get(self, request: Request) -> Response:
        return Response(rows_for(request.user))


urlpatterns = [
    path("hardware/classes", HardwareClassListView.as_view(), name="api-hardware-classes"),
    path("workers", WorkerListView.as_view(), name="api-workers"),
]
