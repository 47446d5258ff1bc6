"""A measured step time from a real short run on the real Celery worker calibrates the CPU profile."""

from __future__ import annotations

import time
from typing import Any

import pytest
from rest_framework.test import APIClient

from builder.configs.models import HardwareCalibration
from tests.builder.test_configs_api import TINY
from tests.conftest import signed_in
from tests.services import Stack
from workers.engine.estimate import estimate_time
from workers.engine.hardware import get_profile
from workers.engine.spec import load_spec

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def wait_done(client: APIClient, calibration_id: int, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/api/hardware/calibrations/{calibration_id}").json()
        if body["state"] in ("succeeded", "failed"):
            return body
        time.sleep(0.5)
    raise TimeoutError(f"calibration {calibration_id} still {body['state']} after {timeout}s")


def test_a_worker_run_calibrates_the_profile_for_everyone(stack: Stack, alice: Any, charlie: Any) -> None:
    client = signed_in(alice, APIClient)
    response = client.post("/api/hardware/calibrations", {"spec": TINY, "steps": 3}, format="json")
    assert response.status_code == 202, response.json()
    assert response.json()["state"] == "queued"
    done = wait_done(client, response.json()["id"])
    assert done["state"] == "succeeded", done["error"]
    # The worker said which profile its device is (no GPU here: the CPU) and what it measured.
    assert done["hardware"] == "cpu" and done["device_name"] == "cpu"
    spec = load_spec(TINY)
    assert done["predicted_step_seconds"] == pytest.approx(estimate_time(spec, get_profile("cpu")).step_seconds)
    assert done["factor"] == pytest.approx(done["measured_step_seconds"] / done["predicted_step_seconds"])

    # The factor is applied to estimates of that profile: a device's speed is the hardware's, not the asker's.
    factor = done["factor"]
    hardware = {h["key"]: h for h in client.get("/api/hardware").json()}
    assert hardware["cpu"]["calibration_factor"] == pytest.approx(factor)
    assert hardware["t4"]["calibration_factor"] == 1.0
    for user in (alice, charlie):
        est = (
            signed_in(user, APIClient)
            .post("/api/specs/estimate", {"spec": TINY, "hardware": "cpu"}, format="json")
            .json()
        )
        time_estimate = est["estimate"]["time"]
        assert time_estimate["calibration_factor"] == pytest.approx(factor)
        assert time_estimate["step_seconds"] == pytest.approx(done["measured_step_seconds"], rel=1e-6)

    # The run itself (with its spec) is alice's: charlie neither sees nor lists it.
    assert signed_in(charlie, APIClient).get(f"/api/hardware/calibrations/{done['id']}").status_code == 404
    assert signed_in(charlie, APIClient).get("/api/hardware/calibrations").json() == []
    assert [c["id"] for c in client.get("/api/hardware/calibrations").json()] == [done["id"]]

    # A bad request names its field; a duplicate delivery of the task does nothing.
    bad = client.post("/api/hardware/calibrations", {"steps": 0, "spec": {"model": {"top_k": 1}}}, format="json")
    assert bad.status_code == 400
    assert {e["path"] for e in bad.json()["errors"]} == {"steps", "spec.model.top_k"}
    from builder.configs.calibration import run_calibration

    assert "skipped" in run_calibration(done["id"])
    assert HardwareCalibration.objects.get(pk=done["id"]).factor == pytest.approx(factor)


@pytest.mark.django_db
def test_a_calibration_whose_worker_died_is_failed_with_the_reason(alice: Any, settings: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from builder.configs.calibration import fail_stale_calibrations

    settings.CALIBRATION_TIMEOUT_SECONDS = 60
    now = timezone.now()
    running = dict(requested_by=alice, spec=TINY, state="running")
    stale = HardwareCalibration.objects.create(**running, started_at=now - timedelta(seconds=61))
    fresh = HardwareCalibration.objects.create(**running, started_at=now - timedelta(seconds=30))
    queued = HardwareCalibration.objects.create(requested_by=alice, spec=TINY)
    assert fail_stale_calibrations() == [stale.pk]
    stale.refresh_from_db()
    assert stale.state == "failed" and "worker stopped" in stale.error and stale.finished_at is not None
    assert HardwareCalibration.objects.get(pk=fresh.pk).state == "running"
    assert HardwareCalibration.objects.get(pk=queued.pk).state == "queued"
    assert fail_stale_calibrations() == []  # failed once; a later sweep leaves it alone
