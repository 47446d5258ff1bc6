"""Several web processes behind one address (``uvicorn --workers 2``, as ``platform/entrypoint.sh web`` runs it):
each serves the pages and the job sockets, and a batch published once reaches the viewers of every process, because
Channels groups go through Redis. The load figures (500 viewers on 50 jobs) are ``make soak``'s (bench/soak.py)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from builder.jobs.lifecycle import JOBS, Lease
from builder.jobs.models import Job
from builder.jobs.sink import DatabaseStreamSink
from tests.conftest import session_cookie
from tests.services import UVICORN_OPTIONS, VENV_BIN, Service, Stack, free_port, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

WEB_PROCESSES = 2


@pytest.fixture
def web(stack: Stack, tmp_path: Path) -> Iterator[tuple[Service, str]]:
    """uvicorn with two worker processes on one port, against the session's database and Redis."""
    port = free_port()
    argv = [
        str(VENV_BIN / "uvicorn"), *UVICORN_OPTIONS, "--workers", str(WEB_PROCESSES),
        "--host", "127.0.0.1", "--port", str(port), "builder.asgi:application",
    ]  # fmt: skip
    service = Service("web", argv, stack.env, tmp_path / "web.log").start()
    base = f"http://127.0.0.1:{port}"
    try:

        def serving() -> bool:
            assert service.alive(), service.log_tail()
            with urllib.request.urlopen(f"{base}/accounts/login/", timeout=5) as resp:
                return resp.status == 200

        wait_for(serving, 90, "the web server")
        yield service, base
    finally:
        service.stop()


def _holders(service: Service, port: int) -> dict[int, int]:
    """Established connections on ``port`` per serving process."""
    counts: dict[int, int] = {}
    for proc in psutil.Process(service.pid).children():
        held = [c for c in proc.net_connections(kind="tcp") if c.status == "ESTABLISHED" and c.laddr.port == port]
        if held:
            counts[proc.pid] = len(held)
    return counts


def test_two_web_processes_on_one_address_serve_sockets_that_all_get_the_stream(
    web: tuple[Service, str], alice: Any
) -> None:
    service, base = web
    port = int(base.rsplit(":", 1)[1])
    job = Job.objects.create(owner=alice, name="shared", spec={}, data_source="d.txt", queue="gpu")
    claim = JOBS.claim(job.pk, "test-worker")
    assert claim is not None
    sockets: list[ClientConnection] = []
    with ExitStack() as opened:
        # Connect until both processes hold viewers (the kernel hands the shared socket's connections to whichever
        # process accepts first); each gets the history from the database.
        def both_hold_viewers() -> bool:
            ws = opened.enter_context(
                connect(
                    base.replace("http://", "ws://") + f"/ws/jobs/{job.pk}/",
                    additional_headers={"Cookie": session_cookie(alice)},
                    origin=Origin(base),
                    open_timeout=15,
                )
            )
            sockets.append(ws)
            assert json.loads(ws.recv(timeout=15))["type"] == "history"
            return len(_holders(service, port)) == WEB_PROCESSES

        wait_for(both_hold_viewers, 60, "viewers on both web processes", interval=0)
        holders = _holders(service, port)
        assert sum(holders.values()) == len(sockets)
        # A batch stored and published once by the real sink, from this process (as a worker would).
        sink = DatabaseStreamSink(Lease(pk=claim.pk, token=claim.token, attempt=claim.attempt, worker=claim.worker))
        sink.emit(1, {"loss": 2.5, "lr": 1e-3})
        sink.close()
        for ws in sockets:
            message = json.loads(ws.recv(timeout=15))
            assert message["type"] == "metrics" and message["seq_from"] == 1 and message["seq_to"] == 2
            assert sorted(name for _, _, name, _ in message["points"]) == ["loss", "lr"]
        # Pages too: every request is answered, whichever process takes it.
        for _ in range(6):
            with urllib.request.urlopen(f"{base}/accounts/login/", timeout=10) as resp:
                assert resp.status == 200
