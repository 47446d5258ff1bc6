"""Fair share between users on a busy hardware class: a delivery claims the queued job of the user with the fewest
running jobs on the class (then the one whose turn came longest ago), not the oldest message. Checked on the claim
itself, then with a real Celery worker of concurrency 1: alice queues 3 jobs, bob 1, and bob's runs second."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from builder.datasets.models import Dataset
from builder.fleet.models import Worker
from builder.jobs import lifecycle
from builder.jobs.models import Job, JobState
from builder.jobs.submit import Submission, submit_job
from tests.builder.test_jobs import corpus, dataset, tiny_spec  # noqa: F401  (fixtures)
from tests.services import VENV_BIN, Service, Stack, wait_for, wait_worker_ready
from workers.engine.spec import load_spec


def _queued(owner: Any, queue: str = "gpu") -> Job:
    spec = load_spec(tiny_spec(5)).model_dump(mode="json")
    return Job.objects.create(owner=owner, name=f"{owner.username}'s", spec=spec, data_source="d.txt", queue=queue)


@pytest.mark.django_db
def test_a_delivery_claims_the_job_of_the_user_with_the_fewest_running(alice: Any, bob: Any, charlie: Any) -> None:
    a1, a2, a3 = (_queued(alice) for _ in range(3))
    assert lifecycle.claim(a1.pk, "w@h:1").job_id == a1.pk  # type: ignore[union-attr]
    b1 = _queued(bob)
    other_class = _queued(charlie, queue="cpu")
    # A2's message arrives while alice runs A1: it runs bob's job, not hers.
    assert lifecycle.claim(a2.pk, "w@h:2").job_id == b1.pk  # type: ignore[union-attr]
    assert [lifecycle.queue_position(Job.objects.get(pk=j.pk)) for j in (a2, a3)] == [1, 2]
    # B1's own message, later, takes what is left, oldest of alice's first; another class is never taken.
    assert lifecycle.claim(b1.pk, "w@h:3").job_id == a2.pk  # type: ignore[union-attr]
    assert lifecycle.claim(a3.pk, "w@h:4").job_id == a3.pk  # type: ignore[union-attr]
    assert lifecycle.claim(a1.pk, "w@h:5") is None  # nothing queued on gpu: the spare message does nothing
    assert Job.objects.get(pk=other_class.pk).state == JobState.QUEUED


@pytest.mark.django_db
def test_with_nothing_running_users_take_turns(alice: Any, bob: Any) -> None:
    """Alice's first job ran and ended; her second waits beside bob's first: bob has not had a turn yet."""
    done = _queued(alice)
    Job.objects.filter(pk=done.pk).update(state=JobState.SUCCEEDED, heartbeat_at=timezone.now())
    a2 = _queued(alice)
    b1 = _queued(bob)
    assert list(lifecycle.fair_order("gpu").values_list("pk", flat=True)) == [b1.pk, a2.pk]
    assert lifecycle.claim(a2.pk, "w@h:1").job_id == b1.pk  # type: ignore[union-attr]


def _start_worker(env: dict[str, str], logdir: Path, name: str, queues: str) -> Service:
    argv = [
        str(VENV_BIN / "celery"), "-A", "workers.celery", "worker", "--queues", queues, "--concurrency", "1",
        "--hostname", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    return Service("worker", argv, env, logdir / f"{name}.log").start()


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_busy_class_runs_bobs_job_second_not_fourth(
    stack: Stack,
    alice: Any,
    bob: Any,
    dataset: Dataset,  # noqa: F811  (the fixture imported above)
    settings: Any,
    tmp_path: Path,
) -> None:
    """A class of its own (gpu.fair) with one worker of concurrency 1: alice queues 3 jobs, then bob 1. The worker
    starts on a full queue (every job waits for it, and it also sends every queued job's task again at start:
    duplicates that must change nothing). Also: the worker advertises its hardware in the registry and /healthz."""
    classes = {"gpu": "cpu", "gpu.fair": "cpu:1", "cpu": "cpu"}
    settings.QUEUE_HARDWARE = classes
    jobs = [
        submit_job(
            owner, Submission(name=f"{owner.username} {i}", dataset=dataset, queue="gpu.fair", spec=tiny_spec(3))
        )
        for i, owner in enumerate((alice, alice, alice, bob))
    ]
    env = {
        **stack.env,
        "QUEUE_HARDWARE": ",".join(f"{k}={v}" for k, v in classes.items()),
        "REPORTS_AUTO_EVALUATE": "false",
        "WORKER_HEARTBEAT_SECONDS": "1",
    }
    worker = _start_worker(env, tmp_path, "fair", "gpu.fair")
    try:
        wait_worker_ready(worker, stack.redis_url)
        row = wait_for(lambda: Worker.objects.filter(name__startswith="fair@").first(), 60, "the worker's row")
        assert row.queues == ["gpu.fair"] and row.hardware["device_type"] == "cpu", row.hardware
        assert row.hardware["count"] >= 1 and row.hardware["memory_bytes"] > 2**30
        with urllib.request.urlopen(f"{stack.base_url}/healthz", timeout=30) as resp:
            health = json.loads(resp.read())
        (advertised,) = [w for w in health["workers"] if w["name"] == row.name]
        assert advertised["hardware"]["device_type"] == "cpu" and advertised["state"] == "live"
        assert "job" not in json.dumps(advertised)  # /healthz is public: hardware only

        def all_done() -> bool:
            states = set(Job.objects.filter(pk__in=[j.pk for j in jobs]).values_list("state", flat=True))
            assert not states & {JobState.FAILED, JobState.CANCELLED}, worker.log_tail()
            return states == {JobState.SUCCEEDED}

        wait_for(all_done, 240, "the four jobs to succeed", interval=0.5)
        started = Job.objects.filter(pk__in=[j.pk for j in jobs]).order_by("started_at")
        order = [(job.owner.username, job.name) for job in started]
        print("run order:", order)
        assert [owner for owner, _ in order] == ["alice", "bob", "alice", "alice"], order
        assert [name for _, name in order] == ["alice 0", "bob 3", "alice 1", "alice 2"]
        beat_before = Worker.objects.get(pk=row.pk).heartbeat_at
        time.sleep(2.5)
        assert Worker.objects.get(pk=row.pk).heartbeat_at > beat_before  # the heartbeat goes on between jobs
    finally:
        worker.stop()
    stopped = Worker.objects.get(pk=row.pk)
    assert stopped.stopped_at is not None  # a warm shutdown marks it stopped
