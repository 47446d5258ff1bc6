"""The one durable-work base (``builder.core.durable``) under each of its kinds: jobs, reports, hardware
calibrations, dataset processing and sweeps' ticks. The same table of cases runs against every kind; the last tests
run the reaper and redelivery against the session's real worker."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from builder.configs.models import HardwareCalibration
from builder.configs.work import CALIBRATIONS
from builder.core import durable
from builder.datasets import storage
from builder.datasets.models import Dataset, DatasetState, Origin
from builder.datasets.work import ANALYZE_TASK, CLEAN_TASK, DATASETS
from builder.jobs.lifecycle import JOBS
from builder.jobs.models import Job, JobEvent
from builder.reports.models import Report
from builder.reports.work import REPORTS
from builder.sweeps.models import Sweep
from builder.sweeps.work import SWEEPS, TICK_TASK
from tests.services import Stack, wait_for


def _job(owner: Any, **fields: Any) -> Job:
    return Job.objects.create(owner=owner, name="j", spec={}, data_source="datasets/x/d.txt", queue="cpu", **fields)


def _report(owner: Any, **fields: Any) -> Report:
    return Report.objects.create(
        job=_job(owner, state="succeeded", last_checkpoint_step=20), checkpoint_step=20, **fields
    )


def _calibration(owner: Any, **fields: Any) -> HardwareCalibration:
    return HardwareCalibration.objects.create(requested_by=owner, spec={}, **fields)


def _dataset(owner: Any, **fields: Any) -> Dataset:
    return Dataset.objects.create(owner=owner, name="d", format="txt", file_name="datasets/x/d.txt", **fields)


def _sweep(owner: Any, **fields: Any) -> Sweep:
    return Sweep.objects.create(
        owner=owner, name="s", base_spec={}, space=[], budget=1, parallelism=1, study_name=os.urandom(8).hex(), **fields
    )


# (kind, factory, the working state a claim enters, the error field a failure fills)
KINDS: dict[str, tuple[durable.WorkKind[Any], Callable[..., Any], str, str]] = {
    "job": (JOBS, _job, "running", "error"),
    "report": (REPORTS, _report, "running", "error"),
    "calibration": (CALIBRATIONS, _calibration, "running", "error"),
    "dataset": (DATASETS, _dataset, "validating", "error_message"),
    "sweep": (SWEEPS, _sweep, "ticking", "error"),
}


def test_every_kind_of_durable_work_is_registered_once() -> None:
    assert sorted(k.label for k in durable.kinds()) == sorted(KINDS)
    tasks = {k.task for k in durable.kinds()}
    assert tasks == {"jobs.train", "reports.evaluate", "calibration.run", ANALYZE_TASK, TICK_TASK}


@pytest.mark.django_db
@pytest.mark.parametrize("label", list(KINDS))
def test_a_claim_is_exclusive_and_a_lost_claim_can_write_nothing(label: str, alice: Any) -> None:
    kind, make, working, _ = KINDS[label]
    row = make(alice)
    first = kind.claim(row.pk, "w1")
    assert first is not None and (first.attempt, first.token, first.worker) == (1, 1, "w1")
    assert kind.claim(row.pk, "w2") is None  # taken: a duplicate delivery does nothing
    row.refresh_from_db()
    assert (row.state, row.lease_owner, row.attempts) == (working, "w1", 1) and row.heartbeat_at is not None
    assert kind.heartbeat(first)
    # w1 goes silent past its lease: the reaper hands the row back and w2 claims it with a new token.
    type(row).objects.filter(pk=row.pk).update(heartbeat_at=timezone.now() - timedelta(days=1))
    assert kind.reap() == [row.pk]
    row.refresh_from_db()
    assert row.state == kind.queued_state and row.lease_owner == ""
    second = kind.claim(row.pk, "w2")
    assert second is not None and (second.attempt, second.token) == (2, 2)
    assert not kind.heartbeat(first) and not kind.finish(first, kind.failed_state)
    assert kind.finish(second, kind.failed_state)
    assert type(row).objects.get(pk=row.pk).state == kind.failed_state
    assert kind.reap() == []  # a finished row is never reaped


@pytest.mark.django_db
@pytest.mark.parametrize("label", list(KINDS))
def test_the_reaper_fails_a_row_out_of_attempts_with_the_reason_and_leaves_live_ones(label: str, alice: Any) -> None:
    kind, make, working, error_field = KINDS[label]
    old = timezone.now() - timedelta(seconds=kind.lease_seconds() + 5)
    held = {"state": working, "lease_owner": "w9", "lease_token": 7}
    spent = make(alice, attempts=3, heartbeat_at=old, **held)
    live = make(alice, attempts=1, heartbeat_at=timezone.now(), **held)
    queued = make(alice)
    assert kind.reap() == [spent.pk]
    spent.refresh_from_db()
    assert spent.state == kind.failed_state
    assert getattr(spent, error_field).startswith("gave up after 3 attempts: ") and "w9" in getattr(spent, error_field)
    assert type(live).objects.get(pk=live.pk).state == working
    assert type(queued).objects.get(pk=queued.pk).state == kind.queued_state


@pytest.mark.django_db
def test_a_reaped_job_records_why_in_its_events(alice: Any) -> None:
    job = _job(alice)
    assert JOBS.claim(job.pk, "w1") is not None
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(days=1))
    assert JOBS.reap() == [job.pk]
    reasons = [e["reason"] for e in JobEvent.objects.filter(job=job, kind="state").values_list("data", flat=True)]
    assert reasons[-1].startswith("lease of w1 expired")


@pytest.mark.django_db
def test_a_reaped_job_that_was_asked_to_stop_ends_cancelled_with_the_reason(alice: Any) -> None:
    """Queued again it would wait forever: a job with a cancel requested is never claimed."""
    from builder.jobs import lifecycle

    job = _job(alice)
    assert JOBS.claim(job.pk, "w1") is not None
    job.refresh_from_db()
    lifecycle.request_cancel(job, reason="pruned at step 10")
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(days=1))
    assert JOBS.reap() == [job.pk]
    job.refresh_from_db()
    assert job.state == "cancelled"
    reasons = [e["reason"] for e in JobEvent.objects.filter(job=job, kind="state").values_list("data", flat=True)]
    assert reasons[-1] == "pruned at step 10"


@pytest.mark.django_db
def test_a_cleaned_version_without_data_is_cleaned_and_every_other_dataset_is_analyzed(alice: Any) -> None:
    source = _dataset(alice)
    version = _dataset(alice, origin=Origin.CLEANED, parent=source)
    Dataset.objects.filter(pk=version.pk).update(file_name="")
    version.refresh_from_db()
    assert DATASETS.task_of(version) == CLEAN_TASK
    assert DATASETS.task_of(source) == ANALYZE_TASK


# --- with the real worker -----------------------------------------------------------------------------------------


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_dataset_work_lost_with_its_message_or_its_worker_is_done_by_the_real_worker(
    stack: Stack, alice: Any, tmp_path: Path
) -> None:
    """A dataset queued with no message (the broker lost it) is sent again when work is redelivered; one whose
    worker died mid-validation is queued again by the reaper; the real worker finishes both."""
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph of notes\n\nsecond paragraph of notes\n")
    name = storage.save_local_file(f"datasets/test/{tmp_path.name}/notes.txt", path)
    lost = Dataset.objects.create(
        owner=alice, name="lost", format="txt", file_name=name, size_bytes=path.stat().st_size
    )
    orphan = Dataset.objects.create(
        owner=alice,
        name="orphan",
        format="txt",
        file_name=name,
        size_bytes=path.stat().st_size,
        state=DatasetState.VALIDATING,
        attempts=1,
        lease_owner="dead@host:1",
        lease_token=1,
        heartbeat_at=timezone.now() - timedelta(seconds=DATASETS.lease_seconds() + 5),
    )
    assert lost.pk in durable.redeliver_all(["cpu"])["dataset"]
    assert DATASETS.reap() == [orphan.pk]

    def settled(pk: int) -> Dataset | None:
        dataset = Dataset.objects.get(pk=pk)
        return None if dataset.is_busy else dataset

    for dataset_id, attempts in ((lost.pk, 1), (orphan.pk, 2)):
        done: Dataset = wait_for(partial(settled, dataset_id), 60, f"dataset {dataset_id}", interval=0.2)
        assert done.state == DatasetState.READY, done.error_message
        assert done.stats["examples"] == 2 and done.attempts == attempts and done.lease_owner != "dead@host:1"
