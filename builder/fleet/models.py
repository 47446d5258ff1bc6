"""The registry of workers: one row per Celery worker node, written by the worker itself (``builder.fleet.registry``).

The database is the record: a worker inserts its row when it starts (with the hardware it found), renews
``heartbeat_at`` every ``WORKER_HEARTBEAT_SECONDS`` and marks ``stopped_at`` on a warm shutdown. A worker that died
without a word keeps its row with an ageing heartbeat, which is what the workers page shows. What it is working on
is not stored here: it is the running job whose lease names this worker (one truth, in the job's row).
"""

from __future__ import annotations

from typing import Any

from django.db import models


class Worker(models.Model):
    name = models.CharField(max_length=200, unique=True, help_text="Celery's node name, e.g. gpu@host.")
    pid = models.PositiveIntegerField(default=0)
    queues: models.JSONField[Any] = models.JSONField(default=list, help_text="The queues (hardware classes) it takes.")
    hardware: models.JSONField[Any] = models.JSONField(
        default=dict, help_text="What workers.engine.devices found: type, count, memory, bf16."
    )
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField(db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name
