"""Hardware calibrations as durable work (``builder.core.durable``): sent to the training queue, claimed by one
worker, renewed by a heartbeat while it times the run, queued again when that worker goes silent, failed with the
reason after its attempts."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from builder.configs.models import HardwareCalibration
from builder.core.durable import WorkKind, register

CALIBRATE_TASK = "calibration.run"  # workers.tasks.calibration


class CalibrationWork(WorkKind[HardwareCalibration]):
    label = "calibration"
    model = HardwareCalibration
    task = CALIBRATE_TASK

    def lease_seconds(self) -> int:
        return int(settings.CALIBRATION_TIMEOUT_SECONDS)

    def queue_of(self, row: HardwareCalibration) -> str:
        # The device that trains is the one measured: the default hardware class's.
        return str(settings.JOBS_DEFAULT_QUEUE)

    def claim_fields(self, now: Any) -> dict[str, Any]:
        return {"started_at": now}

    def stale_reason(self, row: HardwareCalibration) -> str:
        return (
            f"its worker {row.lease_owner} stopped (no heartbeat within {self.lease_seconds()} s): restart it and retry"
        )


CALIBRATIONS = register(CalibrationWork())
