"""Training jobs through the real worker: dispatch, the metric record and its live stream, cancel, crash recovery."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.test import Client
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from builder.datasets.models import Dataset
from builder.jobs.models import Job, JobEvent, MetricPoint
from tests.conftest import session_cookie, signed_in
from tests.services import (
    Stack,
    service_env,
    shared_database_url,
    start_beat,
    start_redis,
    start_worker,
    wait_for,
    wait_worker_ready,
)

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

# A corpus with a pattern a tiny model can learn; bytes tokenizer so that preparing it takes no time.
# Paragraphs (TXT documents) separated by blank lines, so a validation share can be held out.
CORPUS = "\n\n".join(
    " ".join(f"the expert {(i + j) % 7} routes token {j % 5} to layer {i % 3}." for j in range(8)) for i in range(60)
)


def tiny_spec(max_steps: int, **training: Any) -> dict[str, Any]:
    return {
        "model": {
            "vocab_size": 260, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "max_seq_len": 32,
            "moe": {"num_routed_experts": 4, "num_shared_experts": 1, "top_k": 2, "expert_hidden_size": 32},
        },
        "training": {
            "batch_size": 4, "max_steps": max_steps, "log_interval": 1, "eval_interval": 10, "eval_batches": 2,
            "checkpoint_interval": 10, "schedule": {"warmup_steps": 2}, "optimizer": {"lr": 3e-3},
            **training,
        },
        "data": {"tokenizer": "bytes", "seq_len": 32, "val_fraction": 0.1},
    }  # fmt: skip


@pytest.fixture
def corpus() -> str:
    return default_storage.save("datasets/test/corpus.txt", ContentFile(CORPUS.encode()))


@pytest.fixture
def dataset(alice: Any, corpus: str) -> Dataset:
    """Alice's ready dataset over ``corpus`` (as an upload that a worker validated would be)."""
    return Dataset.objects.create(
        owner=alice, name="tiny corpus", format="txt", file_name=corpus, size_bytes=len(CORPUS), state="ready"
    )


def submit(client: Client, dataset: Dataset, max_steps: int, **training: Any) -> dict[str, Any]:
    response = client.post(
        "/api/jobs",
        {"name": "tiny", "spec": tiny_spec(max_steps, **training), "dataset": dataset.pk, "queue": "gpu"},
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    return response.json()


def wait_state(job_id: int, states: set[str], timeout: float = 120) -> Job:
    def done() -> Job | None:
        job = Job.objects.get(pk=job_id)
        return job if job.state in states else None

    return wait_for(done, timeout, f"job {job_id} to reach {states}", interval=0.2)


def ws_url(stack: Stack, job_id: int) -> str:
    return stack.base_url.replace("http://", "ws://") + f"/ws/jobs/{job_id}/"


def test_api_validates_and_names_the_field(client: Client, alice: Any, charlie: Any, dataset: Dataset) -> None:
    client.force_login(alice)
    spec = tiny_spec(10)
    spec["model"]["moe"]["top_k"] = 9
    response = client.post(
        "/api/jobs", {"name": "x", "spec": spec, "dataset": dataset.pk}, content_type="application/json"
    )
    assert response.status_code == 422  # top_k against the expert count: a rule the JSON Schema cannot state
    assert any("model.moe.top_k" in e for e in response.json()["spec"])
    response = client.post(
        "/api/jobs", {"name": "x", "spec": tiny_spec(10), "queue": "tpu"}, content_type="application/json"
    )
    assert response.status_code == 400
    assert set(response.json()) == {"dataset", "queue"}
    # Someone else's dataset does not exist for charlie.
    client.force_login(charlie)
    response = client.post(
        "/api/jobs", {"name": "x", "spec": tiny_spec(10), "dataset": dataset.pk}, content_type="application/json"
    )
    assert response.status_code == 422 and set(response.json()) == {"dataset"}  # an id naming nothing of hers
    assert Job.objects.count() == 0


def test_a_job_runs_end_to_end_and_the_socket_gets_every_point(
    stack: Stack, client: Client, alice: Any, charlie: Any, dataset: Dataset
) -> None:
    client.force_login(alice)
    job = submit(client, dataset, max_steps=60)
    received: dict[tuple[int, str], float] = {}
    seqs: list[int] = []
    state = None
    with connect(
        ws_url(stack, job["id"]),
        additional_headers={"Cookie": session_cookie(alice)},
        origin=Origin(stack.base_url),
        open_timeout=10,
    ) as ws:
        history = json.loads(ws.recv(timeout=10))
        assert history["type"] == "history" and history["job"]["id"] == job["id"]
        for name, series in history["series"].items():
            for step, value in zip(series["step"], series["value"], strict=True):
                received[(step, name)] = value
        last_seq = history["seq"]
        deadline = time.monotonic() + 180
        while state not in ("succeeded", "failed") and time.monotonic() < deadline:
            message = json.loads(ws.recv(timeout=60))
            if message["type"] == "metrics":
                # In order, with no gap and no duplicate: each batch starts right after the last one.
                assert message["seq_from"] == last_seq + 1, (message["seq_from"], last_seq)
                assert [p[0] for p in message["points"]] == list(range(message["seq_from"], message["seq_to"] + 1))
                last_seq = message["seq_to"]
                seqs.extend(p[0] for p in message["points"])
                for _, step, name, value in message["points"]:
                    received[(step, name)] = value
            elif message["type"] == "state":
                state = message["state"]
    assert state == "succeeded", Job.objects.get(pk=job["id"]).error
    stored = {(p.step, p.name): p.value for p in MetricPoint.objects.filter(job_id=job["id"])}
    assert received == stored
    assert len(seqs) == len(set(seqs))
    loss_steps = sorted(step for step, name in stored if name == "loss")
    assert loss_steps == list(range(1, 61))
    assert any(name.startswith("expert_load/") for _, name in stored)
    # The API's gap recovery returns the same record.
    page = client.get(f"/api/jobs/{job['id']}/metrics?after=0&limit=100000").json()
    assert {(s, n): v for _, s, n, v in page["points"]} == stored
    finished = Job.objects.get(pk=job["id"])
    assert finished.attempts == 1 and finished.step == 60 and finished.last_checkpoint_step == 60
    kinds = list(JobEvent.objects.filter(job_id=job["id"]).values_list("kind", flat=True))
    assert "checkpoint" in kinds and kinds.count("state") >= 3
    csv: Any = client.get(f"/api/jobs/{job['id']}/metrics.csv")  # a streaming response
    assert csv.status_code == 200 and b"step,name,value" in b"".join(csv.streaming_content)
    tb = client.get(f"/api/jobs/{job['id']}/tensorboard.tar.gz")
    assert tb.status_code == 200 and tb["Content-Type"] == "application/gzip"

    # The outsider sees nothing: API 404, socket refused.
    outsider = signed_in(charlie)
    assert outsider.get(f"/api/jobs/{job['id']}").status_code == 404
    assert outsider.get(f"/api/jobs/{job['id']}/metrics").status_code == 404
    assert outsider.post(f"/api/jobs/{job['id']}/cancel").status_code == 404
    assert job["id"] not in [j["id"] for j in outsider.get("/api/jobs").json()]
    with pytest.raises(InvalidStatus) as refused:
        connect(
            ws_url(stack, job["id"]),
            additional_headers={"Cookie": session_cookie(charlie)},
            origin=Origin(stack.base_url),
            open_timeout=10,
        )
    assert refused.value.response.status_code == 403


def _last_logged_step(job_id: int) -> int:
    from builder.jobs.files import job_layout

    path = job_layout(job_id).run.metrics
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "metrics":
            steps.append(record["step"])
    return max(steps)


def test_cancel_stops_within_two_steps_and_resume_continues(
    stack: Stack, client: Client, alice: Any, dataset: Dataset
) -> None:
    client.force_login(alice)
    job = submit(client, dataset, max_steps=100000)
    wait_for(lambda: _last_logged_step(job["id"]) >= 15, 120, "the job to run 15 steps")
    at_cancel = _last_logged_step(job["id"])
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    cancelled = wait_state(job["id"], {"cancelled", "failed"})
    assert cancelled.state == "cancelled"
    final = cancelled.result["step"]
    assert at_cancel <= final <= at_cancel + 2, (at_cancel, final)
    assert cancelled.last_checkpoint_step == final  # the stop wrote a checkpoint
    # Cancelling again is refused; resume continues from the checkpoint on a fresh attempt.
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 409
    assert client.post(f"/api/jobs/{job['id']}/resume").status_code == 200
    wait_for(lambda: _last_logged_step(job["id"]) >= final + 3, 120, "the resumed job to make progress")
    resumed = Job.objects.get(pk=job["id"])
    assert resumed.state == "running" and resumed.attempts == 1
    assert JobEvent.objects.filter(job_id=job["id"], kind="resume").exists()
    client.post(f"/api/jobs/{job['id']}/cancel")
    wait_state(job["id"], {"cancelled"})


def test_a_killed_worker_is_reaped_and_the_job_resumes_from_its_checkpoint(
    stack: Stack, client: Client, alice: Any, corpus: str, tmp_path: Path
) -> None:
    """A stack of its own (Redis, beat, workers) so that killing its worker disturbs no other test."""
    redis_service, url = start_redis(tmp_path / "redis")
    env = service_env(
        url,
        shared_database_url(),
        Path(stack.env["MEDIA_ROOT"]),
        JOB_HEARTBEAT_SECONDS="1",
        JOB_LEASE_SECONDS="4",
        JOB_REAPER_INTERVAL_SECONDS="1",
        REPORTS_AUTO_EVALUATE="false",  # this stack's workers are stopped at the end: no report to wait for
    )
    services = [redis_service]
    try:
        first = start_worker(env, tmp_path, "doomed")
        services.append(first)
        wait_worker_ready(first, url)
        services.append(start_beat(env, tmp_path))
        from workers.tasks.jobs import train

        client.force_login(alice)
        # Submitted through this stack's broker: create the row, then send the task to this Redis.
        job = Job.objects.create(
            owner=alice, name="crash", spec=tiny_spec(200), data_source=corpus, queue="gpu", total_steps=200
        )
        # celery-types does not list apply_async's ``connection`` option (Celery accepts it).
        train.apply_async(args=(job.pk,), queue="gpu", connection=_connection(url))  # type: ignore[call-arg]
        wait_for(
            lambda: (Job.objects.get(pk=job.pk).last_checkpoint_step or 0) >= 20 and _last_logged_step(job.pk) >= 25,
            120,
            "a checkpoint and some steps past it",
        )
        first.stop(sig=signal.SIGKILL)  # no goodbye: the lease just stops being renewed
        crashed_at = _last_logged_step(job.pk)
        second = start_worker(env, tmp_path, "rescuer")
        services.append(second)
        done = wait_state(job.pk, {"succeeded", "failed"}, timeout=180)
        assert done.state == "succeeded", done.error
        assert done.attempts == 2
        reasons = list(JobEvent.objects.filter(job=done, kind="state").values_list("data", flat=True))
        assert any("expired" in (r.get("reason") or "") for r in reasons), reasons
        resume = JobEvent.objects.filter(job=done, kind="resume").get()
        assert 20 <= resume.step <= crashed_at
        counts = Counter(MetricPoint.objects.filter(job=done).values_list("step", "name"))
        assert set(counts.values()) == {1}
        assert sorted(s for s, n in counts if n == "loss") == list(range(1, 201))
    finally:
        for service in reversed(services):
            service.stop()


def test_a_stopping_worker_preempts_its_job_and_the_next_worker_continues_it(
    stack: Stack, client: Client, alice: Any, corpus: str, tmp_path: Path
) -> None:
    """SIGTERM to the worker's main process only (as `docker stop` sends it): the worker asks its pool process to
    stop, the job checkpoints at the step it reached, is recorded preempted and queued again, and a new worker
    continues it. A job queued while no message could be sent (the broker was down) is delivered when a worker
    starts."""
    redis_service, url = start_redis(tmp_path / "redis")
    env = service_env(url, shared_database_url(), Path(stack.env["MEDIA_ROOT"]), REPORTS_AUTO_EVALUATE="false")
    services = [redis_service]
    try:
        first = start_worker(env, tmp_path, "stopping")
        services.append(first)
        wait_worker_ready(first, url)
        from workers.tasks.jobs import train

        job = Job.objects.create(
            owner=alice, name="preempt", spec=tiny_spec(150), data_source=corpus, queue="gpu", total_steps=150
        )
        train.apply_async(args=(job.pk,), queue="gpu", connection=_connection(url))  # type: ignore[call-arg]
        wait_for(lambda: _last_logged_step(job.pk) >= 15, 120, "some steps")
        assert first.proc is not None
        os.kill(first.proc.pid, signal.SIGTERM)  # the main process alone, not its process group
        first.proc.wait(timeout=60)
        stopped = Job.objects.get(pk=job.pk)
        assert stopped.state == "queued", stopped.error
        states = {e.data.get("reason"): e.step for e in JobEvent.objects.filter(job=job, kind="state")}
        assert "re-queued after preemption" in states
        # The checkpoint was written at the step the run had reached when it was told to stop.
        assert stopped.last_checkpoint_step is not None and stopped.last_checkpoint_step >= 15
        assert states["worker shutting down"] == stopped.last_checkpoint_step == _last_logged_step(job.pk)

        stranded = Job.objects.create(  # queued in the database, never sent to the broker
            owner=alice, name="stranded", spec=tiny_spec(20), data_source=corpus, queue="gpu", total_steps=20
        )
        second = start_worker(env, tmp_path, "next")
        services.append(second)
        done = wait_state(job.pk, {"succeeded", "failed"}, timeout=180)
        assert done.state == "succeeded", done.error
        assert JobEvent.objects.filter(job=done, kind="resume").get().step == stopped.last_checkpoint_step
        counts = Counter(MetricPoint.objects.filter(job=done).values_list("step", "name"))
        assert set(counts.values()) == {1}
        assert sorted(s for s, n in counts if n == "loss") == list(range(1, 151))
        assert wait_state(stranded.pk, {"succeeded", "failed"}, timeout=120).state == "succeeded"
    finally:
        for service in reversed(services):
            service.stop()


def _connection(url: str) -> Any:
    from workers.celery import app

    return app.connection_for_write(url)
