"""The platform against real services: health, a Celery round trip, the websocket's access rules."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from tests.conftest import session_cookie
from tests.services import (
    Stack,
    service_env,
    shared_database_url,
    start_asgi,
    start_redis,
    start_worker,
    wait_worker_ready,
)

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=20) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_healthz_is_green_with_the_real_services(stack: Stack) -> None:
    status, body = _get_json(f"{stack.base_url}/healthz")
    assert status == 200, body
    checks = body["checks"]
    assert body["status"] == "ok"
    assert checks["database"]["ok"] and checks["database"]["vendor"] == "sqlite"
    assert checks["redis"]["ok"] and checks["redis"]["version"].startswith("6.")
    assert checks["celery"]["ok"] and checks["celery"]["workers"] == 1
    assert checks["celery"]["queues"] == ["cpu", "gpu"]
    assert checks["storage"]["ok"]


def test_celery_round_trip_through_the_real_worker(stack: Stack) -> None:
    from workers.tasks.maintenance import ping

    result = ping.delay("hello").get(timeout=30)
    assert result["payload"] == "hello"
    assert result["pid"] != os.getpid()
    assert stack.worker is not None and stack.worker.alive()
    # Each queue is bound to its own routing key: a task sent to gpu runs once, on the gpu queue.
    from workers.celery import app

    queues = app.control.inspect(timeout=2).active_queues()
    assert queues is not None
    (bindings,) = queues.values()
    assert {q["name"]: q["routing_key"] for q in bindings} == {"gpu": "gpu", "cpu": "cpu"}
    assert ping.apply_async(args=("on-gpu",), queue="gpu").get(timeout=30)["payload"] == "on-gpu"
    # A message sent by name under a task's name from before the tasks were split by kind still runs.
    legacy = app.send_task("workers.tasks.ping", args=("old name",), queue="cpu").get(timeout=30)
    assert legacy["payload"] == "old name" and legacy["pid"] != os.getpid()


def test_websocket_accepts_a_signed_in_user(stack: Stack, alice: Any) -> None:
    ws_url = stack.base_url.replace("http://", "ws://") + "/ws/status/"
    headers = {"Cookie": session_cookie(alice)}
    with connect(ws_url, additional_headers=headers, origin=Origin(stack.base_url), open_timeout=10) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello == {"type": "hello", "user": "alice"}
        health = json.loads(ws.recv(timeout=20))
        assert health["type"] == "health" and health["report"]["status"] == "ok"
        assert 'data-service="celery"' in health["html"]
        ws.send("not json")
        assert json.loads(ws.recv(timeout=10)) == {
            "type": "error", "field": "", "message": "messages must be JSON objects"
        }  # fmt: skip
        ws.send(json.dumps({"type": "subscribe"}))
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["field"] == "type"


def test_websocket_refuses_an_anonymous_user(stack: Stack) -> None:
    ws_url = stack.base_url.replace("http://", "ws://") + "/ws/status/"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url, origin=Origin(stack.base_url), open_timeout=10)
    assert refused.value.response.status_code == 403


def test_websocket_refuses_a_foreign_origin(stack: Stack, alice: Any) -> None:
    ws_url = stack.base_url.replace("http://", "ws://") + "/ws/status/"
    headers = {"Cookie": session_cookie(alice)}
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url, additional_headers=headers, origin=Origin("http://evil.example"), open_timeout=10)
    assert refused.value.response.status_code == 403


def test_healthz_turns_503_when_redis_stops(stack: Stack, tmp_path: Path) -> None:
    """A stack of its own (Redis, worker, ASGI server), so that stopping its Redis disturbs no other test."""
    redis_service, url = start_redis(tmp_path / "redis")
    env = service_env(url, shared_database_url(), Path(stack.env["MEDIA_ROOT"]))
    worker = asgi = None
    try:
        worker = start_worker(env, tmp_path, "outage")
        asgi, base = start_asgi(env, tmp_path)
        wait_worker_ready(worker, url)
        status, body = _get_json(f"{base}/healthz")
        assert status == 200, body
        redis_service.stop()
        status, body = _get_json(f"{base}/healthz")
        assert status == 503
        assert body["status"] == "fail"
        assert body["checks"]["redis"]["ok"] is False and "Error" in body["checks"]["redis"]["error"]
        assert body["checks"]["celery"]["ok"] is False
        assert body["checks"]["database"]["ok"] and body["checks"]["storage"]["ok"]
    finally:
        for service in (asgi, worker, redis_service):
            if service is not None:
                service.stop()
