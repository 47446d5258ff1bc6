"""Hardware calibrations: ``calibration.run`` (``builder.configs.calibration.run_calibration``)."""

from __future__ import annotations

from typing import Any

from builder.configs.work import CALIBRATE_TASK
from builder.core.durable import this_worker
from workers.celery import app


@app.task(name=CALIBRATE_TASK, bind=True, acks_late=True)
def run(self: Any, calibration_id: int) -> dict[str, Any]:
    """Time a short training run of calibration ``calibration_id``'s spec on this worker's device and record
    measured / predicted step time for the device's hardware profile (a duplicate delivery does nothing)."""
    from builder.configs.calibration import run_calibration

    return run_calibration(calibration_id, this_worker(self.request.hostname))
