"""A real Celery worker measures its CPU when it starts and the CPU estimates follow (``workers.engine.probe`` through
``builder.fleet.registry`` to ``builder.core.profiles``). The session's workers run with the probe off
(``tests.services.service_env``), so this test starts one of its own, on a Redis of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from builder.fleet.models import Worker
from tests.builder.test_configs_api import TINY
from tests.conftest import signed_in
from tests.services import (
    Stack,
    service_env,
    shared_database_url,
    start_redis,
    start_worker,
    wait_for,
    wait_worker_ready,
)
from workers.engine.estimate import estimate_time
from workers.engine.hardware import PROFILES, CpuRates, cpu_profile
from workers.engine.spec import load_spec

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def _measured(name: str) -> CpuRates | None:
    worker = Worker.objects.filter(name__startswith=f"{name}@").first()
    if worker is None or not isinstance(worker.hardware.get("rates"), dict):
        return None
    return CpuRates.from_dict(worker.hardware["rates"])


def test_a_started_worker_measures_its_cpu_and_the_estimates_use_it(stack: Stack, alice: Any, tmp_path: Path) -> None:
    redis_service, url = start_redis(tmp_path / "redis")
    env = service_env(
        url,
        shared_database_url(),
        Path(stack.env["MEDIA_ROOT"]),
        WORKER_CPU_PROBE="true",
        REPORTS_AUTO_EVALUATE="false",
    )
    services = [redis_service]
    try:
        worker = start_worker(env, tmp_path, "prober", concurrency=1)
        services.append(worker)
        wait_worker_ready(worker, url)
        rates = wait_for(lambda: _measured("prober"), 120, "the worker's measured CPU rates")
        assert rates.matmul_flops > 1e9 and rates.layer_seconds > 0 and rates.copy_bytes_per_s > 1e8

        client = signed_in(alice, APIClient)
        cpu = {h["key"]: h for h in client.get("/api/hardware").json()}["cpu"]
        assert cpu["notes"].startswith(f"Measured by its workers ({rates.threads} thread")
        assert cpu["peak_flops"]["fp32"] == pytest.approx(rates.matmul_flops)
        step = client.post("/api/specs/estimate", {"spec": TINY, "hardware": "cpu"}, format="json").json()
        measured = estimate_time(load_spec(TINY), cpu_profile(rates=rates)).step_seconds
        assert step["estimate"]["time"]["step_seconds"] == pytest.approx(measured)
        assert measured != pytest.approx(estimate_time(load_spec(TINY), PROFILES["cpu"]).step_seconds)
        page = signed_in(alice).get("/workers/").content.decode()
        assert f"measured {rates.matmul_flops / 1e9:.0f} GFLOP/s fp32 matmul" in page
    finally:
        for service in reversed(services):
            service.stop()
