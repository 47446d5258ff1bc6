"""`make run`'s process tree under supervisord (platform/supervisord.conf): every process killed with SIGKILL comes
back by itself, a job whose worker was killed resumes by itself, and SIGINT (Ctrl-C) stops everything, leaving
nothing behind. The platform runs as `make run` runs it, on the test database and storage, with its own Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from json import loads
from pathlib import Path
from typing import Any

import psutil
import pytest

from builder.core.enqueue import send
from builder.datasets.models import Dataset
from builder.jobs.lifecycle import TRAIN_TASK
from builder.jobs.models import Job, JobEvent
from tests.builder.test_jobs import CORPUS, corpus, tiny_spec, wait_state  # noqa: F401  (corpus: a fixture)
from tests.services import (
    ROOT,
    VENV_BIN,
    Service,
    Stack,
    free_port,
    point_at_redis,
    service_env,
    shared_database_url,
    wait_for,
)

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

PROGRAMS = ("web", "worker", "cpuworker", "beat", "redis")


def _healthy(base_url: str) -> bool:
    """Every check of /healthz passes, with both workers (gpu and cpu) answering."""
    try:
        with urllib.request.urlopen(f"{base_url}/healthz", timeout=3) as response:
            body = loads(response.read())
    except Exception:
        return False
    return body["status"] == "ok" and body["checks"]["celery"].get("workers") == 2


def _pid(env: dict[str, str], program: str) -> int:
    out = subprocess.run(
        [str(VENV_BIN / "supervisorctl"), "-c", str(ROOT / "platform" / "supervisord.conf"), "pid", program],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
    )
    return int(out.stdout.strip() or 0)


def test_killed_processes_come_back_and_ctrl_c_leaves_nothing_behind(
    stack: Stack,
    alice: Any,
    corpus: str,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    settings: Any,
) -> None:
    port, redis_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    var = tmp_path / "var"
    var.mkdir()
    env = service_env(
        url,
        shared_database_url(),
        Path(stack.env["MEDIA_ROOT"]),
        VAR_DIR=str(var),
        WEB_PORT=str(port),
        EMBEDDED_REDIS="true",
        REPORTS_AUTO_EVALUATE="false",
    )
    supervisor = Service(
        "supervisord",
        [str(VENV_BIN / "supervisord"), "-c", str(ROOT / "platform" / "supervisord.conf")],
        env,
        var / "out.log",
    ).start()
    base_url = f"http://127.0.0.1:{port}"
    point_at_redis(url)
    try:
        wait_for(lambda: _healthy(base_url), 90, "the platform under supervisord")
        tree = psutil.Process(supervisor.pid)

        # Each process killed outright comes back, and the platform is healthy again within 30 s.
        recovered: dict[str, float] = {}
        for program in PROGRAMS:
            old = _pid(env, program)
            assert old > 0, program
            os.kill(old, signal.SIGKILL)
            began = time.monotonic()

            def back(program: str = program, old: int = old) -> bool:
                return _pid(env, program) not in (0, old) and _healthy(base_url)

            wait_for(back, 30, f"{program} back")
            recovered[program] = time.monotonic() - began
        print("recovered after kill -9 (s):", {k: round(v, 1) for k, v in recovered.items()})

        # A job whose worker is killed while it trains resumes by itself.
        dataset = Dataset.objects.create(
            owner=alice, name="corpus", format="txt", file_name=corpus, size_bytes=len(CORPUS), state="ready"
        )
        job = Job.objects.create(
            owner=alice, name="survives", spec=tiny_spec(150), dataset=dataset, data_source=corpus, queue="gpu"
        )
        send(TRAIN_TASK, job.pk, queue="gpu")
        wait_for(lambda: (Job.objects.get(pk=job.pk).last_checkpoint_step or 0) >= 10, 120, "a checkpoint")
        os.kill(_pid(env, "worker"), signal.SIGKILL)
        done = wait_state(job.pk, {"succeeded", "failed", "cancelled"}, timeout=180)
        assert done.state == "succeeded", done.error
        states = [e["to"] for e in JobEvent.objects.filter(job=done, kind="state").values_list("data", flat=True)]
        assert "preempted" in states and states.count("running") == 2, states  # told to stop, then continued

        # Ctrl-C: supervisord stops every program (in order) and exits; no process of the tree is left.
        children = tree.children(recursive=True)
        assert len(children) >= len(PROGRAMS)
        os.kill(supervisor.pid, signal.SIGINT)
        assert supervisor.proc is not None
        supervisor.proc.wait(timeout=90)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], [" ".join(p.cmdline()) for p in alive]
    finally:
        point_at_redis(stack.redis_url)
        supervisor.stop()
