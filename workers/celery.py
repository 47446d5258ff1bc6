"""The Celery app. Workers consume the queues ``gpu`` (training; CPU fallback when no GPU) and ``cpu``.

Configuration comes from Django settings (``CELERY_*``): JSON only, late acks, prefetch 1, routes to
``gpu``/``cpu``. Start a worker with ``celery -A workers.celery worker -Q gpu,cpu``.
"""

import os

from celery import Celery
from kombu import Exchange, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "builder.settings")

app = Celery("moe_builder")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Each queue gets its own exchange and routing key: with bare Queue(name) both would bind to the default
# queue's exchange and a task routed to one would be delivered to both.
app.conf.task_queues = tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in ("gpu", "cpu"))
app.autodiscover_tasks(["workers"], related_name="tasks", force=True)
