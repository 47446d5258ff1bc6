"""Calibrating a hardware profile from a measured step time: the orchestration behind a thin Celery task.

``request_calibration`` stores a queued ``HardwareCalibration`` and sends its task to the ``gpu`` queue (the
training device, so the measurement is of the device that trains) once the row is committed. ``run_calibration``
runs on the worker: it claims the row (durable work, ``builder.configs.work``: a conditional update, so a
duplicate delivery does nothing), times a short training run with ``workers.engine.calibrate`` while a heartbeat
renews the claim, and records which profile the device is, the measured and predicted step times and their ratio.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from django.conf import settings

from builder.configs.models import HardwareCalibration
from builder.configs.services import stored_spec
from builder.configs.work import CALIBRATIONS
from builder.core.durable import Heartbeat, WorkState
from builder.core.profiles import hardware_profile
from builder.core.redaction import describe_failure, hide_server_paths
from workers.engine.estimate import estimate_time
from workers.engine.spec import Spec, load_spec

log = logging.getLogger(__name__)
WARMUP_STEPS = 2


def request_calibration(user: Any, spec: Spec, steps: int) -> HardwareCalibration:
    calibration = HardwareCalibration.objects.create(requested_by=user, spec=stored_spec(spec), steps=steps)
    CALIBRATIONS.dispatch(calibration)
    return calibration


def run_calibration(calibration_id: int, worker: str) -> dict[str, Any]:
    """Claim, measure, record. Returns the outcome as a JSON-able dict (also stored on the row)."""
    claimed = CALIBRATIONS.claim(calibration_id, worker)
    if claimed is None:
        return {"id": calibration_id, "skipped": "not queued (already run, or unknown)"}
    calibration = HardwareCalibration.objects.get(pk=calibration_id)
    outcome: dict[str, Any] = {}
    try:
        from workers.engine.calibrate import measure_training

        spec = load_spec(calibration.spec)
        with Heartbeat(CALIBRATIONS, claimed, settings.JOB_HEARTBEAT_SECONDS):
            measured = measure_training(spec, steps=calibration.steps, warmup=WARMUP_STEPS)
        if measured.hardware is None:
            raise RuntimeError(f"no hardware profile matches the device {measured.device_name!r}")
        # The profile the estimates apply the factor to: the CPU's with its workers' measured rates.
        profile = hardware_profile(measured.hardware)
        predicted = estimate_time(spec, profile).step_seconds
        outcome = {
            "state": WorkState.SUCCEEDED,
            "hardware": profile.key,
            "device_name": measured.device_name,
            "measured_step_seconds": measured.step_seconds,
            "predicted_step_seconds": predicted,
            "factor": measured.step_seconds / predicted,
        }
    except Exception as exc:  # the outcome is recorded either way: the row says why it failed
        log.exception("calibration %s failed", calibration_id)
        outcome = {
            "state": WorkState.FAILED,
            "error": hide_server_paths(f"{describe_failure(exc)}\n{traceback.format_exc(limit=3)}")[:4000],
        }
    # Fenced: a worker presumed dead (its calibration reaped and run elsewhere) records nothing.
    if not CALIBRATIONS.finish(claimed, **outcome):
        return {"id": calibration_id, "skipped": "claim lost"}
    return {
        "id": calibration_id,
        "state": outcome["state"],
        "hardware": outcome.get("hardware", ""),
        "factor": outcome.get("factor"),
        "measured_step_seconds": outcome.get("measured_step_seconds"),
    }
