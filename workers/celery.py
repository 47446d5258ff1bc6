"""The Celery app. Workers consume one queue per hardware class (``builder.core.hardware_classes``; by default ``gpu``,
training with a CPU fallback when no GPU, and ``cpu``).

Configuration comes from Django settings (``CELERY_*``): JSON only, late acks, prefetch 1, routes to
the default class. Start a worker with ``celery -A workers.celery worker -Q gpu,cpu`` (``-Q gpu.a100x8`` ...).

This module holds no task and imports no app code: the web side imports it to send tasks by name
(``builder.core.enqueue``). The task modules (``workers.tasks``) are loaded by workers only, through ``include``.
"""

import os

from celery import Celery
from django.conf import settings
from kombu import Exchange, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "builder.settings")

app = Celery("moe_builder", include=["workers.tasks"])
app.config_from_object("django.conf:settings", namespace="CELERY")
# Each queue gets its own exchange and routing key: with bare Queue(name) both would bind to the default
# queue's exchange and a task routed to one would be delivered to both.
# One queue per hardware class (``QUEUE_HARDWARE``: ``gpu`` and ``cpu`` by default; ``cpu`` is always one of them).
app.conf.task_queues = tuple(
    Queue(name, Exchange(name, type="direct"), routing_key=name) for name in settings.QUEUE_HARDWARE
)
