"""A Redis outage strands nothing: jobs accepted before, during and after it all succeed with no manual step.

A stack of its own (Redis, a worker with one pool process, beat, an ASGI server) shares the test database and
storage. Redis is stopped while one job trains and another waits in the queue, and started again empty (as a
Redis without persistence comes back): the waiting job's message is gone with it, and a job submitted during the
outage was never sent. Beat sends both again (``REDELIVER_AFTER_SECONDS``); the job socket serves the record from
the database while the channel layer is unreachable and picks the live stream up again afterwards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.sync.client import connect
from websockets.typing import Origin

from builder.datasets.models import Dataset
from builder.jobs.models import Job, JobEvent
from tests.builder.test_jobs import CORPUS, corpus, tiny_spec, wait_state  # noqa: F401  (corpus: a fixture)
from tests.conftest import session_cookie, signed_in
from tests.services import (
    Stack,
    point_at_redis,
    service_env,
    shared_database_url,
    start_asgi,
    start_beat,
    start_redis,
    start_worker,
    wait_worker_ready,
)

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def _submit(client: Any, dataset: Dataset, name: str, steps: int) -> tuple[int, float, int]:
    """POST a job; returns (status, seconds the answer took, job id or 0)."""
    began = time.monotonic()
    response = client.post(
        "/api/jobs",
        {"name": name, "spec": tiny_spec(steps), "dataset": dataset.pk, "queue": "gpu"},
        content_type="application/json",
    )
    took = time.monotonic() - began
    return response.status_code, took, response.json().get("id", 0) if response.status_code == 201 else 0


def test_jobs_accepted_before_during_and_after_a_redis_outage_all_succeed(
    stack: Stack,
    alice: Any,
    corpus: str,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    settings: Any,
) -> None:
    settings.JOBS_MAX_ACTIVE_PER_USER = 10
    dataset = Dataset.objects.create(
        owner=alice, name="tiny corpus", format="txt", file_name=corpus, size_bytes=len(CORPUS), state="ready"
    )
    redis_service, url = start_redis(tmp_path / "redis-1")
    port = urlsplit(url).port
    assert port is not None
    env = service_env(
        url,
        shared_database_url(),
        Path(stack.env["MEDIA_ROOT"]),
        JOB_REAPER_INTERVAL_SECONDS="1",
        REDELIVER_AFTER_SECONDS="3",
        REPORTS_AUTO_EVALUATE="false",  # this stack stops at the end: no report to wait for
    )
    services = [redis_service]
    point_at_redis(url)
    try:
        worker = start_worker(env, tmp_path, "outage", concurrency=1)  # one job at a time: the next one waits
        services.append(worker)
        services.append(start_beat(env, tmp_path))
        asgi, base_url = start_asgi(env, tmp_path)
        services.append(asgi)
        wait_worker_ready(worker, url)
        client = signed_in(alice)

        status, _, running = _submit(client, dataset, "trains through the outage", 200)
        assert status == 201
        wait_state(running, {"running"}, timeout=60)
        status, _, waiting = _submit(client, dataset, "queued before the outage", 40)
        assert status == 201 and Job.objects.get(pk=waiting).state == "queued"

        redis_service.stop()
        # While Redis is down: a submission is recorded and answered at once (sent later by beat) ...
        status, took, during = _submit(client, dataset, "submitted during the outage", 40)
        assert status == 201 and took < 3.0, (status, took)
        print(f"a submission while Redis is down: {status} in {took:.2f} s")
        # ... and the job's socket opens with the record from the database, saying live updates are paused.
        with connect(
            base_url.replace("http://", "ws://") + f"/ws/jobs/{running}/",
            additional_headers={"Cookie": session_cookie(alice)},
            origin=Origin(base_url),
            open_timeout=10,
        ) as ws:
            history = json.loads(ws.recv(timeout=10))
            assert history["type"] == "history" and history["job"]["id"] == running
            paused = json.loads(ws.recv(timeout=10))
            assert paused["type"] == "live" and paused["paused"] is True
            # The record keeps coming from the database while the stream is down.
            seen = history["seq"]
            deadline = time.monotonic() + 30
            while seen <= history["seq"] and time.monotonic() < deadline:
                message = json.loads(ws.recv(timeout=10))
                if message["type"] == "metrics":
                    assert message["seq_from"] == seen + 1
                    seen = message["seq_to"]
            assert seen > history["seq"], "no point came from the record while the stream was paused"

            # Redis comes back empty: the waiting job's message was lost with it.
            redis_service, _ = start_redis(tmp_path / "redis-2", port=port)
            services.append(redis_service)
            deadline = time.monotonic() + 30
            resumed = None
            while resumed is None and time.monotonic() < deadline:
                message = json.loads(ws.recv(timeout=10))
                if message["type"] == "live":
                    resumed = message
            assert resumed is not None and resumed["paused"] is False

        status, _, after = _submit(client, dataset, "submitted after the outage", 40)
        assert status == 201
        restarted = time.monotonic()
        for job_id in (running, waiting, during, after):
            done = wait_state(job_id, {"succeeded", "failed", "cancelled"}, timeout=240)
            assert done.state == "succeeded", (done.name, done.error)
        print(f"all four jobs succeeded {time.monotonic() - restarted:.1f} s after Redis came back; jobs lost: 0")
        # The two whose messages never reached the worker (which never restarted) were sent again by beat, and
        # each ran once: a duplicate message finds the job claimed.
        for job_id in (waiting, during):
            claims = JobEvent.objects.filter(job_id=job_id, kind="state", data__to="running").count()
            assert claims == 1
    finally:
        point_at_redis(stack.redis_url)
        for service in reversed(services):
            service.stop()
