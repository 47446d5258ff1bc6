"""The workers page, its API and its websocket: each worker's hardware, current job and heartbeat, for signed-in users
only; a job's name and link only for those who may see the job (alice, its owner; bob, it is shared with him),
never for the outsider (charlie), who sees that the worker is busy and nothing more."""

from __future__ import annotations

import contextlib
import json
import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from builder.fleet import registry
from builder.fleet.models import Worker
from builder.jobs.models import Job, JobState
from tests.builder.test_jobs import tiny_spec
from tests.conftest import session_cookie, signed_in
from tests.services import Stack, wait_for

SECRET = "alice-secret-run"
CPU = {"device_type": "cpu", "count": 2, "name": "Intel Xeon", "memory_bytes": 25 * 2**30, "bf16": True}
A100 = {"device_type": "cuda", "count": 8, "name": "NVIDIA A100-SXM4-80GB", "memory_bytes": 85 * 10**9,
        "bf16": True, "profile": "a100-80gb"}  # fmt: skip


def _worker(name: str, hardware: dict[str, Any], queues: list[str], age_s: float = 0.5) -> Worker:
    at = timezone.now() - timedelta(seconds=age_s)
    return Worker.objects.create(name=name, pid=1, queues=queues, hardware=hardware, started_at=at, heartbeat_at=at)


def _busy_with_alices_job(alice: Any, worker: Worker) -> Job:
    return Job.objects.create(
        owner=alice, name=SECRET, spec=tiny_spec(5), data_source="d.txt", queue="gpu", state=JobState.RUNNING,
        lease_owner=f"{worker.name}:4242", lease_token=1, heartbeat_at=timezone.now(),
    )  # fmt: skip


@pytest.mark.django_db
def test_a_cpu_worker_shows_its_native_bf16_units_and_one_without_them_shows_no_bf16(alice: Any) -> None:
    """What ``workers.engine.devices`` reports: the units named from ``/proc/cpuinfo``, bf16 false without them."""
    _worker("cpu@amx", {**CPU, "bf16_units": ["AMX", "AVX-512 BF16"]}, ["cpu"])
    _worker("cpu@old", {**CPU, "name": "Old Xeon", "bf16": False, "bf16_units": []}, ["cpu"])
    page = signed_in(alice).get("/workers/").content.decode()
    assert "2 cores of Intel Xeon (cpu), 25.0 GiB RAM, bf16 (AMX, AVX-512 BF16)" in page
    assert "2 cores of Old Xeon (cpu), 25.0 GiB RAM<" in page
    rows = {row["name"]: row for row in signed_in(alice).get("/api/workers").json()}
    assert rows["cpu@amx"]["hardware"]["bf16_units"] == ["AMX", "AVX-512 BF16"]
    assert rows["cpu@old"]["hardware"]["bf16"] is False


@pytest.mark.django_db
def test_alice_sees_her_job_on_its_worker_and_charlie_sees_only_that_it_is_busy(
    alice: Any, bob: Any, charlie: Any, settings: Any
) -> None:
    settings.QUEUE_HARDWARE = {"gpu": "cpu", "gpu.a100x8": "a100-80gb:8", "cpu": "cpu"}
    busy = _worker("gpu@host-a", CPU, ["gpu"])
    _worker("a100@host-b", A100, ["gpu.a100x8"], age_s=60)  # missed its beats: silent
    job = _busy_with_alices_job(alice, busy)
    job.shared_with.add(bob)

    page = signed_in(alice).get("/workers/").content.decode()
    assert SECRET in page and f'href="/jobs/{job.pk}/"' in page
    assert "2 cores of Intel Xeon (cpu), 25.0 GiB RAM, bf16" in page
    assert "8 × NVIDIA A100-SXM4-80GB (cuda)" in page and ">silent<" in page and ">live<" in page
    assert SECRET in signed_in(bob).get("/workers/").content.decode()  # shared with him

    outsider = signed_in(charlie).get("/workers/").content.decode()
    assert "busy: another user's job" in outsider
    assert SECRET not in outsider and f"/jobs/{job.pk}/" not in outsider and "alice" not in outsider
    rows = {row["name"]: row for row in signed_in(charlie).get("/api/workers").json()}
    assert rows["gpu@host-a"]["jobs"] == [{"visible": False}]
    assert rows["a100@host-b"]["state"] == "silent" and rows["a100@host-b"]["jobs"] == []
    mine = {row["name"]: row for row in signed_in(alice).get("/api/workers").json()}
    assert [job["name"] for job in mine["gpu@host-a"]["jobs"]] == [SECRET]
    assert mine["gpu@host-a"]["hardware"]["count"] == 2

    anonymous = Client()
    assert anonymous.get("/workers/").status_code == 302
    assert anonymous.get("/api/workers").status_code == 401


@pytest.mark.django_db
def test_each_queue_a_worker_consumes_says_what_its_class_trains_on(alice: Any, settings: Any) -> None:
    """Seen on the workers page: a CPU-only worker listed "gpu" with nothing else (the default class is named gpu and
    trains on the CPU). Each queue now says what it trains on, for CPU and CUDA classes alike."""
    settings.QUEUE_HARDWARE = {"gpu": "cpu", "gpu.a100x8": "a100-80gb:8", "cpu": "cpu"}
    _worker("worker@cpu-only", CPU, ["cpu", "gpu"])
    _worker("a100@host-b", A100, ["gpu.a100x8"])
    _worker("odd@host-c", CPU, ["celery"])
    page = signed_in(alice).get("/workers/").content.decode()
    cells = {
        name: " ".join(re.sub(r"<[^>]+>", " ", cell).split())
        for name, cell in re.findall(r'<tr data-worker="([^"]+)">.*?<td data-cell="queues">(.*?)</td>', page, re.S)
    }
    assert cells == {
        "worker@cpu-only": "cpu on CPU gpu on CPU",
        "a100@host-b": "gpu.a100x8 on 8 × NVIDIA A100 80 GB",
        "odd@host-c": "celery not a hardware class",
    }
    assert '<div data-queue="gpu" data-device-type="cpu">' in page
    rows = {row["name"]: row for row in signed_in(alice).get("/api/workers").json()}
    assert rows["worker@cpu-only"]["queues"] == ["cpu", "gpu"]
    assert rows["worker@cpu-only"]["classes"][1] == {"queue": "gpu", "device_type": "cpu", "devices": "on CPU"}
    assert rows["a100@host-b"]["classes"] == [
        {"queue": "gpu.a100x8", "device_type": "cuda", "devices": "on 8 × NVIDIA A100 80 GB"}
    ]


@pytest.mark.django_db
def test_a_worker_with_less_than_its_class_promises_is_flagged(alice: Any, settings: Any) -> None:
    settings.QUEUE_HARDWARE = {"gpu.a100x8": "a100-80gb:8", "cpu": "cpu"}
    _worker("a100@small", {**A100, "count": 2}, ["gpu.a100x8"])
    _worker("a100@cpu-only", CPU, ["gpu.a100x8"])
    rows = {row["name"]: row for row in signed_in(alice).get("/api/workers").json()}
    assert rows["a100@small"]["mismatches"] == ["class gpu.a100x8 expects 8 devices; this worker has 2"]
    assert rows["a100@cpu-only"]["mismatches"][0].startswith("class gpu.a100x8 expects NVIDIA A100 80 GB")


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_the_socket_pushes_the_registry_as_each_user_may_see_it(stack: Stack, alice: Any, charlie: Any) -> None:
    """Over a real websocket: anonymous is refused; a change published by a worker reaches alice at once
    with her job's name, and charlie without it. The session's own worker has advertised itself meanwhile."""
    ws_url = stack.base_url.replace("http://", "ws://") + "/ws/workers/"
    with pytest.raises(InvalidStatus) as refused:  # closed before it was accepted: the handshake is refused
        connect(ws_url, origin=Origin(stack.base_url), open_timeout=10)
    assert refused.value.response.status_code == 403

    # The session's worker (tests/conftest.py's stack) advertises what it found on this machine once it is up.
    wait_for(lambda: Worker.objects.filter(name__startswith="worker@").exists(), 60, "the session worker's row")

    def open_as(user: Any) -> tuple[Any, dict[str, Any]]:
        headers = {"Cookie": session_cookie(user)}
        socket = sockets.enter_context(connect(ws_url, additional_headers=headers, origin=Origin(stack.base_url)))
        first = json.loads(socket.recv(timeout=10))
        assert first["type"] == "workers"
        return socket, first

    with contextlib.ExitStack() as sockets:
        alices, first = open_as(alice)
        charlies, _ = open_as(charlie)
        session_worker = [w for w in first["workers"] if w["name"].startswith("worker@")]
        assert session_worker and session_worker[0]["hardware"]["device_type"] == "cpu", first["workers"]
        busy = _worker("gpu@pushed", CPU, ["gpu"])
        _busy_with_alices_job(alice, busy)
        registry.publish_change()

        def next_with(socket: Any, name: str) -> dict[str, Any]:
            for _ in range(20):
                message = json.loads(socket.recv(timeout=15))
                rows = {row["name"]: row for row in message["workers"]}
                if name in rows:
                    return {"row": rows[name], "html": message["html"]}
            raise AssertionError(f"{name} never arrived")

        seen = next_with(alices, "gpu@pushed")
        assert seen["row"]["jobs"][0]["name"] == SECRET and SECRET in seen["html"]
        hidden = next_with(charlies, "gpu@pushed")
        assert hidden["row"]["jobs"] == [{"visible": False}] and SECRET not in hidden["html"]
        alices.send(json.dumps({"type": "nonsense"}))
        for _ in range(20):
            message = json.loads(alices.recv(timeout=15))
            if message["type"] == "error":
                assert message["field"] == "type"
                break
        else:
            raise AssertionError("no error for an unknown message")
