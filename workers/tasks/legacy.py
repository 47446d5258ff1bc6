"""The task names used before the tasks were split by kind of work (``workers.tasks.train_job`` ...).

Messages sent under those names before an upgrade may still sit in the broker: they are accepted and run the
current task until they drain. Nothing sends these names any more; remove this module one release later.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from workers.celery import app
from workers.tasks import calibration, datasets, jobs, maintenance, reports

RENAMED: dict[str, Task] = {
    jobs.LEGACY_TRAIN_TASK: jobs.train,
    "workers.tasks.evaluate_report": reports.evaluate,
    "workers.tasks.analyze_dataset": datasets.analyze,
    "workers.tasks.clean_dataset": datasets.clean,
    "workers.tasks.calibrate_hardware": calibration.run,
    "workers.tasks.ping": maintenance.ping,
    # The three reapers beat used to send: each now reaps every kind of work (cheap and idempotent).
    "workers.tasks.reap_jobs": maintenance.reap,
    "workers.tasks.reap_calibrations": maintenance.reap,
    "workers.tasks.reap_reports": maintenance.reap,
}


def _alias(old: str, current: Task) -> None:
    @app.task(name=old, acks_late=True)
    def forward(*args: Any) -> Any:
        # The current task's code, called in this worker process (it names the worker by host and pid).
        return current.run(*args)


for _old, _current in RENAMED.items():
    _alias(_old, _current)
