"""The Celery tasks, one module per kind of work. Each is a thin adapter: it takes an id, calls one plain function
of the app that owns the row (which claims the row, does the work and records the outcome), and returns a small
JSON-able summary.

Only workers import this package (the Celery app lists it in ``include``); the web side sends tasks by name
(``builder.core.enqueue``), so the two never import each other in a circle.
"""

from workers.tasks import calibration, datasets, fleet, jobs, legacy, maintenance, reports, sweeps

__all__ = ["calibration", "datasets", "fleet", "jobs", "legacy", "maintenance", "reports", "sweeps"]
