"""Health checks of the services the platform depends on: database, Redis, Celery workers, storage.

``check_all()`` never raises: each check reports ``ok`` plus details or the error, and takes a bounded time
(Redis and Celery calls have short timeouts) so that the health endpoint stays responsive when a service is down.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import connection

from builder.core.hardware_classes import queue_classes
from builder.core.redaction import describe_failure

CheckResult = dict[str, Any]


def _timed(fn: Callable[[], dict[str, Any]]) -> CheckResult:
    start = time.perf_counter()
    try:
        result = {"ok": True, **fn()}
    except Exception as exc:  # a health check reports every failure instead of raising it
        result = {"ok": False, "error": describe_failure(exc)}
    result["latency_ms"] = round((time.perf_counter() - start) * 1000, 1)
    return result


def check_database() -> CheckResult:
    def run() -> dict[str, Any]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return {"vendor": connection.vendor}

    return _timed(run)


def check_redis() -> CheckResult:
    def run() -> dict[str, Any]:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
        try:
            client.ping()
            info = client.info("server")
        finally:
            client.close()
        return {"version": info.get("redis_version"), "embedded": settings.REDIS_EMBEDDED}

    return _timed(run)


def check_celery(timeout: float = 1.0) -> CheckResult:
    """Workers that answer a broadcast within ``timeout``, and the queues they consume."""

    def run() -> dict[str, Any]:
        from workers.celery import app

        replies = app.control.inspect(timeout=timeout).active_queues() or {}
        workers = {name: sorted(q["name"] for q in queues) for name, queues in replies.items()}
        queues = sorted({q for qs in workers.values() for q in qs})
        if not workers:
            raise RuntimeError("no Celery worker answered")
        return {"workers": len(workers), "queues": queues, "by_worker": workers}

    return _timed(run)


def check_storage() -> CheckResult:
    def run() -> dict[str, Any]:
        name = default_storage.save(f"healthz/{uuid.uuid4().hex}.txt", ContentFile(b"ok"))
        try:
            with default_storage.open(name) as fh:
                if fh.read() != b"ok":
                    raise RuntimeError("storage returned different bytes")
        finally:
            default_storage.delete(name)
        return {"backend": type(default_storage._wrapped).__name__}  # type: ignore[attr-defined]

    return _timed(run)


# Sections an app adds to the report (``register_section``, from its AppConfig.ready: core imports no app), beside
# the checks: information, not a check, so they never change ``status``. The fleet app adds "workers".
_sections: dict[str, Callable[[], Any]] = {}


def register_section(name: str, read: Callable[[], Any]) -> None:
    """Add ``name: read()`` to every health report (``read`` must say nothing secret: ``/healthz`` is public)."""
    _sections[name] = read


def _sections_report() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, read in _sections.items():
        try:
            out[name] = read()
        except Exception as exc:  # the report never fails because a section could not be read
            out[name] = {"error": describe_failure(exc)}
    return out


def check_all() -> dict[str, Any]:
    """All checks, and the registered sections; ``status`` is ``ok`` only when every check is."""
    checks = {"database": check_database(), "redis": check_redis(), "storage": check_storage()}
    if checks["redis"]["ok"]:
        checks["celery"] = check_celery()
    else:
        # Without the broker a broadcast would block on connection retries; the answer is known anyway.
        checks["celery"] = {"ok": False, "error": "the broker (Redis) is down", "latency_ms": 0.0}
    ok = all(c["ok"] for c in checks.values())
    return {"status": "ok" if ok else "fail", "checks": checks, **_sections_report()}


def health_table_context(report: dict[str, Any]) -> dict[str, Any]:
    """What ``core/_health_table.html`` renders, for the status page and its live websocket alike: the report, and
    the celery queues with the devices each one's hardware class trains on (``queue_classes``), because a queue's
    name says nothing of them (with no ``QUEUE_HARDWARE`` the default class is called gpu and trains on the CPU)."""
    celery = report.get("checks", {}).get("celery", {})
    return {"report": report, "queues": queue_classes(list(celery.get("queues") or []))}
