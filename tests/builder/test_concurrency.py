"""Claims and the per-user quota under 20 simultaneous callers.

Each caller is a thread with a database connection of its own, released together by a barrier, so that the database
decides who wins. These mean most on PostgreSQL (``make test`` runs this file there too, see the README): SQLite
serialises writers (IMMEDIATE transactions), while PostgreSQL runs them side by side under READ COMMITTED, where a
claim that read before it wrote, or a quota that counted before it inserted without locking the owner's row, lets
two callers through.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.conf import settings as django_settings
from django.db import connection

from builder.core.errors import NON_FIELD, Refusal
from builder.datasets.models import Dataset
from builder.jobs import lifecycle
from builder.jobs.lifecycle import JOBS
from builder.jobs.models import Job, JobEvent
from builder.jobs.submit import Submission, submit_job
from tests.services import point_at_redis, start_redis

pytestmark = pytest.mark.django_db(transaction=True)

CALLERS = 20
T = TypeVar("T")

SPEC: dict[str, Any] = {
    "model": {
        "vocab_size": 260, "num_layers": 1, "hidden_size": 16, "num_heads": 2, "max_seq_len": 16,
        "moe": {"num_routed_experts": 2, "num_shared_experts": 0, "top_k": 1, "expert_hidden_size": 8},
    },
    "training": {"max_steps": 10, "schedule": {"warmup_steps": 1}},
    "data": {"tokenizer": "bytes", "seq_len": 16},
}  # fmt: skip


def all_at_once(calls: list[Callable[[], T]]) -> list[T | BaseException]:
    """Run ``calls`` in threads released together; each result, or the exception it raised, in order."""
    barrier = threading.Barrier(len(calls))
    results: list[T | BaseException] = [RuntimeError("did not run")] * len(calls)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = calls[i]()
        except BaseException as exc:  # recorded for the test to judge
            results[i] = exc
        finally:
            connection.close()  # each thread's own connection: a left-open one would keep the test database in use

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller is still running after 120 s"
    return results


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own with no worker behind it: submissions send their task (on commit) and nothing
    takes it, so the jobs stay queued and the session's worker trains none of them."""
    previous = django_settings.REDIS_URL
    service, url = start_redis(tmp_path / "redis")
    point_at_redis(url)
    try:
        yield url
    finally:
        point_at_redis(previous)
        service.stop()


def test_twenty_workers_claiming_the_same_jobs_take_each_exactly_once(alice: Any) -> None:
    jobs = [
        Job.objects.create(owner=alice, name=f"j{i}", spec=SPEC, data_source="d.txt", queue="gpu") for i in range(5)
    ]

    def claim_all(worker: str) -> Callable[[], list[int]]:
        return lambda: [job.pk for job in jobs if JOBS.claim(job.pk, worker) is not None]

    results = all_at_once([claim_all(f"w{i}") for i in range(CALLERS)])
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    taken = sorted(pk for r in results if isinstance(r, list) for pk in r)
    assert taken == sorted(job.pk for job in jobs)  # every job once: no job twice, none lost
    for job in Job.objects.filter(pk__in=taken):
        # One claim each: the first and only token, one attempt, held by the worker that reported it.
        winner = next(f"w{i}" for i, r in enumerate(results) if isinstance(r, list) and job.pk in r)
        assert (job.state, job.lease_token, job.attempts, job.lease_owner) == ("running", 1, 1, winner)


def test_twenty_workers_taking_deliveries_through_fair_share_start_each_job_once(alice: Any, broker: str) -> None:
    """The path a worker really takes (``lifecycle.claim``: fair share may hand a delivery another queued job of the
    class, and the claim records a state event in the same transaction): every job starts exactly once."""
    jobs = [
        Job.objects.create(owner=alice, name=f"j{i}", spec=SPEC, data_source="d.txt", queue="gpu") for i in range(5)
    ]

    def deliveries(worker: str) -> Callable[[], list[int]]:
        def take() -> list[int]:
            leases = (lifecycle.claim(job.pk, worker) for job in jobs)
            return [lease.job_id for lease in leases if lease is not None]

        return take

    results = all_at_once([deliveries(f"w{i}") for i in range(CALLERS)])
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    started = sorted(pk for r in results if isinstance(r, list) for pk in r)
    assert started == sorted(job.pk for job in jobs)
    for job in Job.objects.filter(pk__in=started):
        assert (job.state, job.lease_token, job.attempts) == ("running", 1, 1)
        events = JobEvent.objects.filter(job=job, kind="state")
        assert [e.data["to"] for e in events] == ["running"]
        assert len({e.seq for e in JobEvent.objects.filter(job=job)}) == JobEvent.objects.filter(job=job).count()


def test_twenty_simultaneous_submissions_stay_within_the_per_user_limit(
    alice: Any, charlie: Any, broker: str, settings: Any
) -> None:
    settings.JOBS_MAX_ACTIVE_PER_USER = 3
    dataset = Dataset.objects.create(owner=alice, name="d", format="txt", file_name="datasets/x/d.txt", state="ready")
    theirs = Dataset.objects.create(owner=charlie, name="c", format="txt", file_name="datasets/x/c.txt", state="ready")

    def submit(owner: Any, on: Dataset, i: int) -> Callable[[], int]:
        return lambda: submit_job(owner, Submission(name=f"s{i}", dataset=on, spec=SPEC)).pk

    # Alice's twenty, and two of charlie's among them: his count is his own.
    calls = [submit(alice, dataset, i) for i in range(CALLERS)] + [submit(charlie, theirs, i) for i in range(2)]
    results = all_at_once(calls)
    mine, his = results[:CALLERS], results[CALLERS:]
    created = [r for r in mine if isinstance(r, int)]
    refused = [r for r in mine if isinstance(r, Refusal)]
    unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, Refusal)]
    assert not unexpected, unexpected
    assert len(created) == 3 and len(refused) == CALLERS - 3
    assert all("limit 3" in r.by_field()[NON_FIELD][0] for r in refused)
    assert sorted(Job.objects.filter(owner=alice).values_list("pk", flat=True)) == sorted(created)
    assert all(isinstance(r, int) for r in his) and Job.objects.filter(owner=charlie).count() == 2
    # Every created job has its one "submitted" event; a refused submission left nothing behind.
    assert JobEvent.objects.filter(job__owner=alice, kind="state").count() == 3
