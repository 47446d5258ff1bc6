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

    assert "skipped" in run_calibration(done["id"], "duplicate@host:1")
    assert HardwareCalibration.objects.get(pk=done["id"]).factor == pytest.approx(factor)


def test_a_calibration_whose_worker_died_is_run_again_then_failed_after_its_attempts(
    stack: Stack, alice: Any, settings: Any
) -> None:
    """The reaper hands a silent worker's calibration back to the queue (the real worker then runs it), and fails
    one that used its attempts with the reason; a live one and a queued one are left alone."""
    from datetime import timedelta

    from django.utils import timezone

    from builder.configs.work import CALIBRATIONS

    settings.CALIBRATION_TIMEOUT_SECONDS = 60
    now = timezone.now()
    running = dict(requested_by=alice, spec=TINY, steps=3, state="running", lease_owner="dead@host:1", lease_token=1)
    orphan = HardwareCalibration.objects.create(**running, attempts=1, heartbeat_at=now - timedelta(seconds=61))
    spent = HardwareCalibration.objects.create(**running, attempts=3, heartbeat_at=now - timedelta(seconds=61))
    live = HardwareCalibration.objects.create(**running, attempts=1, heartbeat_at=now - timedelta(seconds=30))
    queued = HardwareCalibration.objects.create(requested_by=alice, spec=TINY)
    assert CALIBRATIONS.reap() == [orphan.pk, spent.pk]
    spent.refresh_from_db()
    assert spent.state == "failed" and spent.finished_at is not None
    assert spent.error.startswith("gave up after 3 attempts: its worker dead@host:1 stopped")
    assert HardwareCalibration.objects.get(pk=live.pk).state == "running"
    assert HardwareCalibration.objects.get(pk=queued.pk).state == "queued"
    # The orphan was sent again: the real worker claims it (a second attempt, by another worker) and measures.
    done = wait_done(signed_in(alice, APIClient), orphan.pk)
    assert done["state"] == "succeeded", done["error"]
    again = HardwareCalibration.objects.get(pk=orphan.pk)
    assert again.attempts == 2 and again.lease_owner != "dead@host:1" and again.lease_token == 2
    assert CALIBRATIONS.reap() == []  # nothing silent is left; the failed one stays failed
