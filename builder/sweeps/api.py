"""Sweeps API: start, list, inspect, stop, and save the best trial as a configuration version."""

from __future__ import annotations

from typing import Any

from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builder.configs.serializers import VersionSerializer
from builder.jobs.throttling import SubmissionThrottle
from builder.sweeps import services
from builder.sweeps.serializers import SaveBestSerializer, SweepCreateSerializer, SweepSerializer


class SweepListView(APIView):
    def get_throttles(self) -> list[Any]:
        # Starting a sweep starts jobs: it counts as a submission. Reading the list does not.
        return [SubmissionThrottle()] if self.request.method == "POST" else super().get_throttles()

    @extend_schema(responses=SweepSerializer(many=True), summary="Your sweeps")
    def get(self, request: Request) -> Response:
        sweeps = services.visible_sweeps(request.user)[:100]
        return Response([services.snapshot(s) for s in sweeps])

    @extend_schema(
        request=SweepCreateSerializer,
        responses={201: SweepSerializer},
        summary="Start a sweep",
        description="An Optuna study (TPE sampler, median or successive-halving pruner on the validation the "
        "trials stream) over a search space of spec fields around a saved configuration version. Every trial is an "
        "ordinary job. 400 names the field at fault: `space.<i>.<key>` for the space (each path and bound is "
        "checked against the spec), `first_trials.<i>.<path>`, `config_version`, `dataset`, `objective`.",
    )
    def post(self, request: Request) -> Response:
        serializer = SweepCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        sweep = services.start_sweep(request.user, serializer.sweep_request())
        return Response(services.snapshot(sweep), status=status.HTTP_201_CREATED)


class SweepDetailView(APIView):
    @extend_schema(responses=SweepSerializer, summary="One sweep: its trials, best trial and importances")
    def get(self, request: Request, sweep_id: int) -> Response:
        return Response(services.snapshot(services.get_visible_sweep(request.user, sweep_id)))


class SweepStopView(APIView):
    @extend_schema(
        request=None,
        responses=SweepSerializer,
        summary="Stop the sweep",
        description="No new trial is asked for; the active trials' jobs are cancelled. 409 when it already ended.",
    )
    def post(self, request: Request, sweep_id: int) -> Response:
        sweep = services.get_visible_sweep(request.user, sweep_id)
        services.stop_sweep(sweep)
        return Response(services.snapshot(sweep))


class SweepSaveBestView(APIView):
    @extend_schema(
        request=SaveBestSerializer,
        responses={201: VersionSerializer},
        summary="Save the best trial as a new version of the configuration",
        description="The best completed trial's spec becomes a new version of the configuration the sweep searched "
        "around, with `note` (default: which trial and its objective). 409 while no trial has completed.",
    )
    def post(self, request: Request, sweep_id: int) -> Response:
        sweep = services.get_visible_sweep(request.user, sweep_id)
        serializer = SaveBestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        version = services.save_best(sweep, serializer.validated_data["note"])
        return Response(VersionSerializer(version).data, status=status.HTTP_201_CREATED)


urlpatterns = [
    path("sweeps", SweepListView.as_view(), name="api-sweeps"),
    path("sweeps/<int:sweep_id>", SweepDetailView.as_view(), name="api-sweep"),
    path("sweeps/<int:sweep_id>/stop", SweepStopView.as_view(), name="api-sweep-stop"),
    path("sweeps/<int:sweep_id>/save-best", SweepSaveBestView.as_view(), name="api-sweep-save-best"),
]
