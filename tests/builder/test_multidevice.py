"""A job that asks for 2 devices trains on 2 processes launched by its Celery worker, and survives a killed rank."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from django.conf import settings as django_settings

from builder.datasets.models import Dataset
from builder.jobs.files import job_layout
from builder.jobs.models import Job, JobEvent, MetricPoint
from tests.builder.test_jobs import CORPUS, corpus, tiny_spec, wait_state  # noqa: F401  (corpus: a fixture)
from tests.conftest import signed_in
from tests.services import (
    point_at_redis,
    service_env,
    shared_database_url,
    start_redis,
    start_worker,
    wait_for,
    wait_worker_ready,
)
from workers.engine.checkpoint import latest_checkpoint

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

TWO_DEVICES = {"distributed": {"devices": 2}, "checkpoint_interval": 5}


@pytest.fixture
def slow_worker(tmp_path: Path, media_root: Path) -> Any:
    """A worker of its own (its own Redis) whose ranks sleep 0.15 s a step: time to kill one mid-run."""
    previous = django_settings.CELERY_BROKER_URL
    redis_service, url = start_redis(tmp_path / "redis")
    env = service_env(url, shared_database_url(), media_root, JOB_RANK_FAULTS=json.dumps({"sleep_per_step_s": 0.15}))
    point_at_redis(url)
    services = [redis_service]
    try:
        worker = start_worker(env, tmp_path, "multidevice", concurrency=1)
        services.append(worker)
        wait_worker_ready(worker, url)
        yield worker
    finally:
        point_at_redis(previous)
        for service in reversed(services):
            service.stop()


def _submit(alice: Any, corpus_name: str, max_steps: int) -> int:
    dataset = Dataset.objects.create(
        owner=alice, name="tiny corpus", format="txt", file_name=corpus_name, size_bytes=len(CORPUS), state="ready"
    )
    client = signed_in(alice)
    spec = tiny_spec(max_steps, **TWO_DEVICES)
    response = client.post(
        "/api/jobs", {"name": "two devices", "spec": spec, "dataset": dataset.pk}, content_type="application/json"
    )
    assert response.status_code == 201, response.content
    job_id: int = response.json()["id"]
    return job_id


def _rank(worker: Any, rank: int) -> psutil.Process | None:
    """The training process of ``rank`` under the worker (the launcher's child with ``RANK`` in its environment)."""
    for child in psutil.Process(worker.pid).children(recursive=True):
        try:
            if "workers.engine.distributed" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


def test_a_two_device_job_trains_on_two_ranks_and_resumes_after_one_is_killed(
    slow_worker: Any,
    alice: Any,
    corpus: str,  # noqa: F811  (the fixture imported above)
) -> None:
    job_id = _submit(alice, corpus, max_steps=16)
    # Killed once it has a checkpoint past step 0 and is training on.
    wait_for(
        lambda: JobEvent.objects.filter(job_id=job_id, kind="checkpoint", step__gte=5).exists(),
        120,
        "the first periodic checkpoint",
        interval=0.1,
    )
    victim = wait_for(lambda: _rank(slow_worker, 1), 10, "rank 1's process")
    steps_before = MetricPoint.objects.filter(job_id=job_id, name="loss").count()
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)

    wait_for(lambda: JobEvent.objects.filter(job_id=job_id, kind="resume").exists(), 120, "the job to resume")
    resumed_after = time.monotonic() - killed_at
    job = wait_state(job_id, {"succeeded", "failed", "cancelled"}, timeout=180)
    print(f"rank 1 killed after {steps_before} logged steps; training again {resumed_after:.1f} s later")
    assert job.state == "succeeded", job.error
    assert job.step == 16
    failed = JobEvent.objects.get(job_id=job_id, kind="rank_failed")
    resume = JobEvent.objects.get(job_id=job_id, kind="resume")
    assert resume.data["step"] == failed.data["step"] >= 5  # from the last checkpoint the killed attempt wrote
    # Rank 0's points reached the record once per step, the replayed ones replaced.
    losses = dict(MetricPoint.objects.filter(job_id=job_id, name="loss").values_list("step", "value"))
    assert sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1]
    # Every rank's expert load, averaged: each layer's fractions sum to 1.
    loads = MetricPoint.objects.filter(job_id=job_id, step=16, name__startswith="expert_load/L0/")
    assert sum(loads.values_list("value", flat=True)) == pytest.approx(1.0, abs=1e-5)
    # The checkpoint the ranks wrote holds every rank's generators; its optimizer state is DDP's single file.
    last = latest_checkpoint(job_layout(job_id).run.checkpoints)
    assert last is not None and (last / "optimizer.pt").is_file()
    # No rank outlives its job.
    assert _rank(slow_worker, 0) is None and _rank(slow_worker, 1) is None
    assert Job.objects.get(pk=job_id).result["status"] == "completed"


@pytest.mark.parametrize("how", ["cancel", "sigterm"])
def test_a_cancel_or_a_preemption_reaches_every_rank_which_stop_together_and_keep_a_checkpoint(
    alice: Any, tmp_path: Path, media_root: Path, how: str
) -> None:
    """The runner's loop without Celery: rank 0's points come back through the tailed file, and a cancel (or SIGTERM
    to the worker's process, a warm shutdown) ends both ranks at the same step with the checkpoint a resume continues
    from."""
    from builder.jobs import lifecycle
    from builder.jobs.multidevice import train_on_devices
    from workers.engine.data import prepare
    from workers.engine.layout import RunLayout
    from workers.engine.sinks import MemorySink
    from workers.engine.spec import load_spec

    spec = load_spec(tiny_spec(40, **TWO_DEVICES))
    job = Job.objects.create(owner=alice, name="j", spec=spec.model_dump(mode="json"), data_source="x.txt", queue="gpu")
    lease = lifecycle.claim(job.pk, "test-worker")
    assert lease is not None
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text(CORPUS)
    run = RunLayout.at(tmp_path / "run")
    prepare(spec, corpus_file, run.prepared_data)
    sink = MemorySink()
    sent: list[int] = []

    def preempt() -> bool:
        """SIGTERM to this process once (the worker's pool process at a warm shutdown); never a cancel."""
        if not sent:
            sent.append(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return False

    result = train_on_devices(
        job.pk,
        lease,
        spec,
        run,
        sink,
        lease_lost=lambda: False,
        cancel_requested=lambda: len(sink.series("loss")) >= 3 and (how == "cancel" or preempt()),
        device="cpu",
        faults={"sleep_per_step_s": 0.2},
    )
    assert result.status == ("stopped" if how == "cancel" else "preempted") and 3 <= result.step < 40
    assert [step for step, _ in sink.series("loss")] == list(range(1, result.step + 1))
    assert result.checkpoint is not None and result.checkpoint.name == f"step-{result.step:06d}"
    assert latest_checkpoint(run.checkpoints) == result.checkpoint
    assert sink.events_of("checkpoint")[-1]["step"] == result.step


def test_the_estimate_api_and_comparison_predict_each_layout(alice: Any) -> None:
    """FSDP is offered beside data and expert parallelism, and predicts less memory per GPU than DDP."""
    from rest_framework.test import APIClient

    client = signed_in(alice, APIClient)
    spec = tiny_spec(10, distributed={"devices": 4}, batch_size=8)
    peaks = {}
    for layout in ("ddp", "expert", "fsdp"):
        response = client.post(
            "/api/specs/estimate",
            {"spec": spec, "hardware": "a100-80gb", "num_gpus": 4, "parallelism": layout},
            format="json",
        )
        assert response.status_code == 200, response.content
        assert response.json()["estimate"]["parallelism"] == layout
        peaks[layout] = response.json()["estimate"]["memory"]["optimizer"]
    assert peaks["fsdp"] < peaks["expert"] < peaks["ddp"]
