"""Thin Celery tasks: take ids, call one function, return a JSON-able outcome."""

from __future__ import annotations

import os
import socket
from typing import Any

from workers.celery import app


@app.task(name="workers.tasks.ping")
def ping(payload: str = "") -> dict[str, Any]:
    """A round trip through the broker and a worker: echoes ``payload`` with where it ran."""
    import torch

    return {
        "payload": payload,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "cuda": torch.cuda.is_available(),
    }


@app.task(name="workers.tasks.train_job", bind=True, acks_late=True)
def train_job(self: Any, job_id: int) -> dict[str, Any]:
    """Claim job ``job_id``, train it (resuming from its last checkpoint) and record the outcome.

    Idempotent: a duplicate delivery finds the job no longer claimable and returns at once.
    """
    from builder.jobs.runner import run_job

    worker = f"{self.request.hostname or socket.gethostname()}:{os.getpid()}"
    return run_job(job_id, worker)


@app.task(name="workers.tasks.evaluate_report", bind=True, acks_late=True)
def evaluate_report(self: Any, report_id: int) -> dict[str, Any]:
    """Claim report ``report_id``, evaluate, export and time its checkpoint, and store every format.

    Idempotent: a duplicate delivery finds the report no longer claimable and returns at once; a rerun of a
    report whose worker died replaces its files.
    """
    from builder.reports.runner import run_report

    worker = f"{self.request.hostname or socket.gethostname()}:{os.getpid()}"
    return run_report(report_id, worker)


@app.task(name="workers.tasks.reap_jobs")
def reap_jobs() -> list[int]:
    """Re-queue jobs whose worker stopped heartbeating (run by Celery beat)."""
    from builder.jobs.lifecycle import reap_expired_leases

    return reap_expired_leases()


@app.task(name="workers.tasks.reap_calibrations")
def reap_calibrations() -> list[int]:
    """Fail hardware calibrations whose worker died mid-run (run by Celery beat)."""
    from builder.configs.calibration import fail_stale_calibrations

    return fail_stale_calibrations()


@app.task(name="workers.tasks.reap_reports")
def reap_reports() -> list[int]:
    """Send again, or fail after their attempts, evaluation reports whose worker died (run by Celery beat)."""
    from builder.reports.services import reap_stale_reports

    return reap_stale_reports()


@app.task(name="workers.tasks.analyze_dataset", acks_late=True)
def analyze_dataset(dataset_id: int) -> dict[str, Any]:
    """Validate dataset ``dataset_id`` and compute its statistics (idempotent: a rerun recomputes the same)."""
    from builder.datasets.processing import analyze_dataset as run

    return run(dataset_id)


@app.task(name="workers.tasks.clean_dataset", acks_late=True)
def clean_dataset(dataset_id: int) -> dict[str, Any]:
    """Clean the source of the new version ``dataset_id``, then describe it (idempotent: outputs are replaced)."""
    from builder.datasets.processing import clean_dataset as run

    return run(dataset_id)


@app.task(name="workers.tasks.calibrate_hardware", acks_late=True)
def calibrate_hardware(calibration_id: int) -> dict[str, Any]:
    """Time a short training run of calibration ``calibration_id``'s spec on this worker's device and record
    measured / predicted step time for the device's hardware profile (a duplicate delivery does nothing)."""
    from builder.configs.calibration import run_calibration

    return run_calibration(calibration_id)
