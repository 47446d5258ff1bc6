"""Calibrating a hardware profile from a measured step time: the orchestration behind a thin Celery task.

``request_calibration`` stores a queued ``HardwareCalibration`` and sends ``workers.tasks.calibrate_hardware``
to the ``gpu`` queue (the training device, so the measurement is of the device that trains) once the row is
committed. ``run_calibration`` runs on the worker: it claims the row (queued → running, a conditional update,
so a duplicate delivery does nothing), times a short training run with ``workers.engine.calibrate``, and
records which profile the device is, the measured and predicted step times and their ratio.
"""

from __future__ import annotations

import logging
import traceback
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from builder.configs.models import CalibrationState, HardwareCalibration
from builder.configs.services import stored_spec
from workers.engine.estimate import estimate_time
from workers.engine.hardware import get_profile
from workers.engine.spec import Spec, load_spec

log = logging.getLogger(__name__)
WARMUP_STEPS = 2


def request_calibration(user: Any, spec: Spec, steps: int) -> HardwareCalibration:
    calibration = HardwareCalibration.objects.create(requested_by=user, spec=stored_spec(spec), steps=steps)

    def send() -> None:
        from workers.tasks import calibrate_hardware

        calibrate_hardware.apply_async(args=(calibration.pk,), queue="gpu")

    transaction.on_commit(send)
    return calibration


def run_calibration(calibration_id: int) -> dict[str, Any]:
    """Claim, measure, record. Returns the outcome as a JSON-able dict (also stored on the row)."""
    claimed = HardwareCalibration.objects.filter(pk=calibration_id, state=CalibrationState.QUEUED).update(
        state=CalibrationState.RUNNING, started_at=timezone.now()
    )
    if not claimed:
        return {"id": calibration_id, "skipped": "not queued (already run, or unknown)"}
    calibration = HardwareCalibration.objects.get(pk=calibration_id)
    try:
        from workers.engine.calibrate import measure_training

        spec = load_spec(calibration.spec)
        measured = measure_training(spec, steps=calibration.steps, warmup=WARMUP_STEPS)
        if measured.hardware is None:
            raise RuntimeError(f"no hardware profile matches the device {measured.device_name!r}")
        profile = get_profile(measured.hardware)
        predicted = estimate_time(spec, profile).step_seconds
        calibration.hardware = profile.key
        calibration.device_name = measured.device_name
        calibration.measured_step_seconds = measured.step_seconds
        calibration.predicted_step_seconds = predicted
        calibration.factor = measured.step_seconds / predicted
        calibration.state = CalibrationState.SUCCEEDED
    except Exception as exc:  # the outcome is recorded either way: the row says why it failed
        log.exception("calibration %s failed", calibration_id)
        calibration.state = CalibrationState.FAILED
        calibration.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"[:4000]
    calibration.finished_at = timezone.now()
    calibration.save()
    return {
        "id": calibration.pk,
        "state": calibration.state,
        "hardware": calibration.hardware,
        "factor": calibration.factor,
        "measured_step_seconds": calibration.measured_step_seconds,
    }


def fail_stale_calibrations() -> list[int]:
    """Fail calibrations left ``running`` for longer than ``CALIBRATION_TIMEOUT_SECONDS`` (their worker died:
    a calibration is a few steps, and the row would otherwise say "running" forever). Returns their ids.

    The update is conditional on the state, so a worker that finishes at the same moment keeps its result.
    """
    limit = settings.CALIBRATION_TIMEOUT_SECONDS
    cutoff = timezone.now() - timedelta(seconds=limit)
    stale = list(
        HardwareCalibration.objects.filter(state=CalibrationState.RUNNING, started_at__lt=cutoff).values_list(
            "pk", flat=True
        )
    )
    failed = []
    for pk in stale:
        done = HardwareCalibration.objects.filter(pk=pk, state=CalibrationState.RUNNING).update(
            state=CalibrationState.FAILED,
            error=f"no result within {limit} s of the worker claiming it: the worker stopped (restart it and retry)",
            finished_at=timezone.now(),
        )
        if done:
            failed.append(pk)
    return failed
