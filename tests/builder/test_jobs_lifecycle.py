"""The job state machine, leases and fencing, queue positions, the per-user limit and history downsampling.

No services: these run in the test's own database transaction, so ``on_commit`` callbacks (dispatch, publish)
never fire; what is checked is what the database records.
"""

from __future__ import annotations

import time
from datetime import timedelta
from itertools import product
from typing import Any

import pytest
from django.utils import timezone

from builder.core.errors import NON_FIELD, Refusal
from builder.datasets.models import Dataset
from builder.jobs import history, lifecycle
from builder.jobs.models import Job, JobEvent, JobState, MetricPoint
from builder.jobs.sink import BackgroundSink, DatabaseStreamSink
from builder.jobs.submit import Submission, submit_job
from tests.conftest import signed_in

pytestmark = pytest.mark.django_db

SPEC: dict[str, Any] = {
    "model": {
        "vocab_size": 260, "num_layers": 1, "hidden_size": 16, "num_heads": 2, "max_seq_len": 16,
        "moe": {"num_routed_experts": 2, "num_shared_experts": 0, "top_k": 1, "expert_hidden_size": 8},
    },
    "training": {"max_steps": 10, "schedule": {"warmup_steps": 1}},
    "data": {"tokenizer": "bytes", "seq_len": 16},
}  # fmt: skip


@pytest.fixture
def dataset(alice: Any) -> Dataset:
    return Dataset.objects.create(owner=alice, name="d", format="txt", file_name="datasets/x/d.txt", state="ready")


def make_job(owner: Any, state: JobState = JobState.QUEUED, queue: str = "gpu", **fields: Any) -> Job:
    return Job.objects.create(
        owner=owner, name="j", spec=SPEC, data_source="datasets/x/d.txt", queue=queue, state=state, **fields
    )


# --- the state machine -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "target"), list(product(JobState, JobState)))
def test_every_transition_is_allowed_or_refused_as_the_table_says(
    alice: Any, start: JobState, target: JobState
) -> None:
    job = make_job(alice, state=start)
    allowed = start in lifecycle.ENTERED_FROM[target]
    assert lifecycle.transition(job.pk, target, reason="test") is allowed
    job.refresh_from_db()
    assert job.state == (target if allowed else start)
    events = JobEvent.objects.filter(job=job, kind="state")
    if allowed:
        assert events.get().data == {"from": str(start), "to": str(target), "reason": "test"}
        assert (job.finished_at is not None) == (target in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED))
    else:
        assert not events.exists()


def test_terminal_states_are_never_left_except_by_resume(alice: Any) -> None:
    # Succeeded is final; failed and cancelled only go back to the queue.
    assert not any(JobState.SUCCEEDED in sources for sources in lifecycle.ENTERED_FROM.values())
    for state in (JobState.FAILED, JobState.CANCELLED):
        leaving = {target for target, sources in lifecycle.ENTERED_FROM.items() if state in sources}
        assert leaving == {JobState.QUEUED}


def test_a_running_job_cannot_be_resumed_by_hand(alice: Any) -> None:
    job = make_job(alice, state=JobState.RUNNING, lease_token=3)
    with pytest.raises(Refusal):
        lifecycle.resume(job)
    job.refresh_from_db()
    assert job.state == JobState.RUNNING and job.lease_token == 3


def test_resume_requeues_with_fresh_attempts(alice: Any) -> None:
    job = make_job(alice, state=JobState.FAILED, attempts=3, error="boom", finished_at=timezone.now())
    lifecycle.resume(job)
    job.refresh_from_db()
    assert (job.state, job.attempts, job.error, job.finished_at) == (JobState.QUEUED, 0, "", None)


def test_cancel_of_a_queued_job_is_immediate_and_of_a_finished_one_refused(alice: Any) -> None:
    queued = make_job(alice)
    lifecycle.request_cancel(queued)
    queued.refresh_from_db()
    assert queued.state == JobState.CANCELLED
    with pytest.raises(Refusal):
        lifecycle.request_cancel(queued)
    running = make_job(alice, state=JobState.RUNNING)
    lifecycle.request_cancel(running)
    running.refresh_from_db()
    assert running.state == JobState.RUNNING and running.cancel_requested  # the worker stops it within a step


# --- leases and fencing ------------------------------------------------------------------------------------------


def test_a_claim_is_exclusive_and_a_stale_token_can_write_nothing(alice: Any) -> None:
    job = make_job(alice)
    first = lifecycle.claim(job.pk, "w1")
    assert first is not None and first.attempt == 1 and first.resume_from is None
    assert lifecycle.claim(job.pk, "w2") is None  # already running: nobody else gets it
    stale_sink = DatabaseStreamSink(first, flush_interval=3600)
    stale_sink.emit(1, {"loss": 2.0})
    stale_sink.flush()
    assert MetricPoint.objects.filter(job=job).count() == 1

    # w1 stalls past its lease; the reaper re-queues the job and w2 claims it with a new token.
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=3600), last_checkpoint_step=0)
    assert lifecycle.reap_expired_leases() == [job.pk]
    second = lifecycle.claim(job.pk, "w2")
    assert second is not None and second.token > first.token and second.attempt == 2
    assert second.resume_from == 0 and Job.objects.get(pk=job.pk).step == 0

    # Everything w1 tries now is refused, and changes nothing.
    assert not lifecycle.heartbeat(first, step=5)
    stale_sink.emit(2, {"loss": 1.0})
    stale_sink.flush()
    assert stale_sink.lost
    stale_sink.event("checkpoint", {"step": 2})
    stale_sink.event("rollback", {"step": 0})  # would delete the points: refused like every other write
    assert not lifecycle.add_event(job.pk, "anomaly", {"step": 2}, step=2, token=first.token)
    assert not lifecycle.transition(job.pk, JobState.SUCCEEDED, token=first.token)
    job.refresh_from_db()
    assert job.state == JobState.RUNNING and job.lease_owner == "w2" and job.step == 0
    assert job.last_checkpoint_step == 0
    assert list(MetricPoint.objects.filter(job=job).values_list("step", "value")) == [(1, 2.0)]
    assert not JobEvent.objects.filter(job=job, kind__in=["anomaly", "checkpoint", "rollback"]).exists()

    # The new owner's writes go through. The engine resumes from the checkpoint of step 0: w1's later points
    # are dropped, and the replayed step keeps one point.
    assert lifecycle.heartbeat(second, step=1)
    sink = DatabaseStreamSink(second, flush_interval=3600)
    sink.event("resume", {"step": 0})
    assert not MetricPoint.objects.filter(job=job).exists()
    sink.emit(1, {"loss": 1.5})
    sink.flush()
    assert not sink.lost and MetricPoint.objects.get(job=job).value == 1.5
    assert lifecycle.transition(job.pk, JobState.SUCCEEDED, token=second.token)


def test_a_resumed_attempt_stores_the_points_the_lost_one_wrote_only_to_its_json_lines(alice: Any) -> None:
    """With several devices rank 0 writes the JSON lines and the worker follows them; a worker killed while
    following loses the points since the last checkpoint event it recorded, though the checkpoint after them may
    be on disk. The next attempt resumes there and never emits them again: its resume event stores them from the
    file, up to the resume step and no further."""
    from builder.jobs.files import job_layout
    from workers.engine.sinks import JsonlSink

    job = make_job(alice)
    first = lifecycle.claim(job.pk, "w1")
    assert first is not None
    record = DatabaseStreamSink(first, flush_interval=3600)
    rank0 = JsonlSink(job_layout(job.pk).run.metrics)
    for step in range(1, 36):
        values = {"loss": float(step), "lr": 0.1}
        rank0.emit(step, values)
        if step <= 20:
            record.emit(step, values)
        if step == 28:  # a rollback to step 25 inside the lost attempt: the replayed steps are the ones that count
            rank0.event("rollback", {"step": 25})
            for replayed in range(26, 29):
                rank0.emit(replayed, {"loss": 100.0 + replayed, "lr": 0.1})
    rank0.emit(30, {"val_loss": float("nan")})  # non-finite: never stored (the stream cannot carry it)
    rank0.close()
    record.event("checkpoint", {"step": 20})
    # The worker dies; its checkpoint of step 30 is on disk, the record heard of the one of step 20.
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED)
    second = lifecycle.claim(job.pk, "w2")
    assert second is not None and second.resume_from == 20
    DatabaseStreamSink(second, flush_interval=3600).event("resume", {"step": 30})
    loss = dict(MetricPoint.objects.filter(job=job, name="loss").values_list("step", "value"))
    assert sorted(loss) == list(range(1, 31))
    assert [loss[s] for s in (25, 26, 28, 29)] == [25.0, 126.0, 128.0, 29.0]
    assert MetricPoint.objects.filter(job=job, name="lr").count() == 30
    assert not MetricPoint.objects.filter(job=job, name="val_loss").exists()


def test_an_attempt_that_starts_from_scratch_drops_the_earlier_points(alice: Any) -> None:
    job = make_job(alice)
    first = lifecycle.claim(job.pk, "w1")
    assert first is not None
    sink = DatabaseStreamSink(first, flush_interval=3600)
    for step in (1, 2, 3):
        sink.emit(step, {"loss": 3.0})
    sink.flush()
    # The worker dies before any checkpoint; the next attempt has none to resume from and starts at step 1.
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED)
    second = lifecycle.claim(job.pk, "w2")
    assert second is not None and second.resume_from is None
    fresh = DatabaseStreamSink(second, flush_interval=3600)
    fresh.emit(1, {"loss": 2.0})
    fresh.flush()
    assert list(MetricPoint.objects.filter(job=job).values_list("step", "value")) == [(1, 2.0)]


@pytest.mark.django_db(transaction=True)  # the background thread reads and writes through its own connection
def test_a_flush_stores_every_point_before_the_trainer_commits_a_checkpoint(alice: Any) -> None:
    """The trainer flushes its sink before committing a checkpoint (workers/engine/sinks.py, write-ahead): the
    database must then hold every point so far, even though the database sink's own interval has not come and no
    checkpoint event followed. A worker killed right after the commit loses nothing: the next attempt resumes
    there and never emits those steps again (seen in CI: steps 21-30 of a run resumed at step 30 were missing)."""
    job = make_job(alice)
    lease = lifecycle.claim(job.pk, "w1")
    assert lease is not None
    sink = BackgroundSink(DatabaseStreamSink(lease, flush_interval=3600))
    try:
        for step in range(1, 31):
            sink.emit(step, {"loss": float(step), "lr": 0.1})
        sink.flush()
        stored = sorted(MetricPoint.objects.filter(job=job, name="loss").values_list("step", flat=True))
        assert stored == list(range(1, 31))
        assert MetricPoint.objects.filter(job=job).count() == 60
    finally:
        sink.close()


def test_the_background_sink_keeps_order_waits_at_checkpoints_and_reports_failures() -> None:
    from workers.engine.sinks import MemorySink

    memory = MemorySink()
    sink = BackgroundSink(memory)
    for step in range(1, 501):
        sink.emit(step, {"loss": float(step)})
    sink.event("checkpoint", {"step": 500})
    # The trainer waited: everything up to the checkpoint has gone through.
    assert len(memory.points) == 500 and memory.events == [("checkpoint", {"step": 500})]
    sink.emit(501, {"loss": 0.5})
    sink.close()
    assert memory.closed and [s for s, _ in memory.points] == list(range(1, 502))

    class Broken(MemorySink):
        def emit(self, step: int, metrics: Any) -> None:
            raise RuntimeError("database down")

    failing = BackgroundSink(Broken())
    failing.emit(1, {"loss": 1.0})
    with pytest.raises(RuntimeError, match="database down"):
        for step in range(2, 10000):  # the error reaches the trainer at a later call
            failing.emit(step, {"loss": 1.0})
            time.sleep(0.001)
    failing.close()


def test_the_reaper_fails_a_job_out_of_attempts_with_the_reason(alice: Any) -> None:
    old = timezone.now() - timedelta(seconds=3600)
    job = make_job(alice, state=JobState.RUNNING, attempts=3, lease_owner="w9", heartbeat_at=old, lease_token=7)
    fresh = make_job(alice, state=JobState.RUNNING, attempts=1, heartbeat_at=timezone.now(), lease_token=1)
    assert lifecycle.reap_expired_leases() == [job.pk]
    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert job.error.startswith("gave up after 3 attempts: lease of w9 expired")
    fresh.refresh_from_db()
    assert fresh.state == JobState.RUNNING


def test_the_sink_keeps_one_point_per_step_and_name_with_increasing_seq(alice: Any) -> None:
    job = make_job(alice)
    lease = lifecycle.claim(job.pk, "w1")
    assert lease is not None
    sink = DatabaseStreamSink(lease, flush_interval=3600)
    for step in (1, 2, 3):
        sink.emit(step, {"loss": float(step), "lr": 0.1})
    sink.flush()
    sink.event("rollback", {"step": 1})  # the engine goes back to step 1 and emits 2, 3 again
    assert set(MetricPoint.objects.filter(job=job).values_list("step", flat=True)) == {1}
    sink.emit(2, {"loss": 20.0, "lr": 0.1})
    sink.flush()
    points = list(MetricPoint.objects.filter(job=job).order_by("seq").values_list("seq", "step", "name", "value"))
    assert [(s, n, v) for _, s, n, v in points] == [(1, "loss", 1.0), (1, "lr", 0.1), (2, "loss", 20.0), (2, "lr", 0.1)]
    assert [p[0] for p in points] == sorted({p[0] for p in points})  # unique, increasing
    assert history.points_after(job, points[1][0]) == [list(p) for p in points[2:]]


# --- queue position ----------------------------------------------------------------------------------------------


def test_queue_position_is_the_fair_share_order_of_the_same_class(alice: Any, charlie: Any) -> None:
    now = timezone.now()
    a = make_job(alice, queued_at=now - timedelta(seconds=30))
    b = make_job(charlie, queued_at=now - timedelta(seconds=20))
    c = make_job(alice, queued_at=now - timedelta(seconds=10))
    cpu = make_job(alice, queue="cpu", queued_at=now - timedelta(seconds=5))
    running = make_job(alice, state=JobState.RUNNING)
    # Alice already runs a job on gpu: charlie's goes first, then hers in the order she queued them; cpu is its own.
    assert [lifecycle.queue_position(j) for j in (a, b, c, cpu, running)] == [2, 1, 3, 1, None]
    # Same instant: the older row goes first, so two jobs never share a position.
    d = make_job(alice, queued_at=c.queued_at)
    assert lifecycle.queue_position(d) == 4
    # A resumed job joins the back of the queue.
    lifecycle.transition(a.pk, JobState.CANCELLED)
    lifecycle.resume(Job.objects.get(pk=a.pk))
    positions = {j.pk: lifecycle.queue_position(Job.objects.get(pk=j.pk)) for j in (a, b, c, d)}
    assert positions == {b.pk: 1, c.pk: 2, d.pk: 3, a.pk: 4}


# --- the per-user limit ------------------------------------------------------------------------------------------


def test_the_per_user_limit_of_active_jobs(alice: Any, charlie: Any, dataset: Dataset, settings: Any) -> None:
    settings.JOBS_MAX_ACTIVE_PER_USER = 2
    first = submit_job(alice, Submission(name="a", dataset=dataset, spec=SPEC))
    submit_job(alice, Submission(name="b", dataset=dataset, spec=SPEC))
    with pytest.raises(Refusal) as refused:
        submit_job(alice, Submission(name="c", dataset=dataset, spec=SPEC))
    assert "limit 2" in refused.value.by_field()[NON_FIELD][0]
    # Through the API: 400 with the reason, no job created.
    client = signed_in(alice)
    response = client.post(
        "/api/jobs", {"name": "c", "spec": SPEC, "dataset": dataset.pk}, content_type="application/json"
    )
    assert response.status_code == 400 and "limit 2" in response.json()["non_field_errors"][0]
    assert Job.objects.filter(owner=alice).count() == 2
    # Another user's jobs do not count against alice's limit, and hers not against theirs.
    charlie_dataset = Dataset.objects.create(owner=charlie, name="c", format="txt", file_name="c.txt", state="ready")
    submit_job(charlie, Submission(name="c", dataset=charlie_dataset, spec=SPEC))
    # A finished job frees a place; resuming it past the limit is refused with 409.
    lifecycle.request_cancel(first)
    third = submit_job(alice, Submission(name="c", dataset=dataset, spec=SPEC))
    assert client.post(f"/api/jobs/{first.pk}/resume").status_code == 409
    lifecycle.request_cancel(third)
    assert client.post(f"/api/jobs/{first.pk}/resume").status_code == 200


def test_a_dataset_in_use_cannot_be_deleted_and_a_job_without_one_cannot_resume(
    alice: Any, dataset: Dataset, media_root: Any
) -> None:
    client = signed_in(alice)
    job = submit_job(alice, Submission(name="a", dataset=dataset, spec=SPEC))
    # A queued job will read the file: deleting the dataset under it is refused, and says which job holds it.
    response = client.delete(f"/api/datasets/{dataset.pk}")
    assert response.status_code == 409, response.content
    assert f"#{job.pk}" in str(response.json())
    assert Dataset.objects.filter(pk=dataset.pk).exists()
    # Once the job stopped, the dataset can go; the job keeps its record but cannot resume without its data.
    lifecycle.request_cancel(job)
    assert client.delete(f"/api/datasets/{dataset.pk}").status_code == 204
    job.refresh_from_db()
    assert job.dataset_id is None and job.state == JobState.CANCELLED
    response = client.post(f"/api/jobs/{job.pk}/resume")
    assert response.status_code == 409 and "deleted" in response.json()["detail"]
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED


def test_the_dataset_sets_the_spec_data_fields(alice: Any) -> None:
    labelled = Dataset.objects.create(
        owner=alice, name="l", format="jsonl", file_name="l.jsonl", state="ready", text_field="body", label_field="tag"
    )
    job = submit_job(alice, Submission(name="a", dataset=labelled, spec=SPEC))
    assert (job.spec["data"]["text_field"], job.spec["data"]["label_field"]) == ("body", "tag")
    assert job.dataset == labelled and job.data_source == "l.jsonl" and job.total_steps == 10
    unlabelled = Dataset.objects.create(owner=alice, name="u", format="txt", file_name="u.txt", state="ready")
    classifier = {**SPEC, "model": {**SPEC["model"], "task": "classification", "num_labels": 3}}
    with pytest.raises(Refusal) as refused:
        submit_job(alice, Submission(name="c", dataset=unlabelled, spec=classifier))
    assert set(refused.value.by_field()) == {"dataset"}


def test_the_api_refuses_datasets_that_are_not_ready_or_not_yours(alice: Any, charlie: Any, dataset: Dataset) -> None:
    client = signed_in(alice)
    busy = Dataset.objects.create(owner=alice, name="b", format="txt", file_name="b.txt", state="validating")
    # Not ready: its state (409). No such dataset of hers: an id the schema cannot check (422).
    for dataset_id, words, status in ((busy.pk, "validating", 409), (999999, "no dataset", 422)):
        response = client.post(
            "/api/jobs", {"name": "x", "spec": SPEC, "dataset": dataset_id}, content_type="application/json"
        )
        assert response.status_code == status and words in response.json()["dataset"][0]
    response = client.post("/api/jobs", {"name": "x", "dataset": dataset.pk}, content_type="application/json")
    assert response.status_code == 422 and set(response.json()) == {"spec"}  # neither spec nor config_version
    response = client.post(
        "/api/jobs", {"name": "x", "spec": [1], "dataset": dataset.pk}, content_type="application/json"
    )
    assert response.status_code == 400 and set(response.json()) == {"spec"}


# --- history -----------------------------------------------------------------------------------------------------


def test_a_spike_stays_visible_in_the_downsampled_history(alice: Any) -> None:
    job = make_job(alice)
    values = [3.0 - i * 1e-4 for i in range(1, 5001)]
    values[3210] = 97.0  # one step of a long run
    values[4000] = -5.0
    MetricPoint.objects.bulk_create(
        MetricPoint(job=job, seq=i + 1, step=i + 1, name="loss", value=v) for i, v in enumerate(values)
    )
    MetricPoint.objects.bulk_create(MetricPoint(job=job, seq=6000 + s, step=s, name="lr", value=0.1) for s in (1, 2))
    Job.objects.filter(pk=job.pk).update(metric_seq=6002)
    data = history.history(job, max_points=300)
    loss = data["series"]["loss"]
    assert data["seq"] == 6002
    assert len(loss["step"]) <= 300 and loss["step"][-1] == 5000 and loss["step"] == sorted(loss["step"])
    assert max(loss["max"]) == 97.0 and min(loss["min"]) == -5.0  # the extremes survive in the envelope
    assert max(loss["value"]) < 97.0  # while the mean line alone would hide them
    spike_bucket = next(i for i, m in enumerate(loss["max"]) if m == 97.0)
    assert loss["step"][spike_bucket - 1] < 3211 <= loss["step"][spike_bucket]
    assert data["series"]["lr"] == {"step": [1, 2], "value": [0.1, 0.1]}  # short series come back whole
    assert set(history.history(job, names=["lr"])["series"]) == {"lr"}


def test_history_leaves_out_points_newer_than_its_sequence_number(alice: Any) -> None:
    job = make_job(alice, metric_seq=2)
    MetricPoint.objects.bulk_create(
        MetricPoint(job=job, seq=seq, step=seq, name="loss", value=1.0) for seq in (1, 2, 3)
    )  # seq 3: a batch committing while the history is read; the live stream delivers it
    data = history.history(job)
    assert data["seq"] == 2 and data["series"]["loss"]["step"] == [1, 2]


def test_a_new_job_never_finds_the_folder_of_a_deleted_one_with_the_same_id(alice: Any, settings: Any) -> None:
    from builder.jobs.files import claim_folder, job_layout

    job = make_job(alice)
    layout = claim_folder(job)
    folder = layout.root
    layout.run.checkpoint(20).mkdir(parents=True)
    assert claim_folder(job) == layout and (folder / "run" / "checkpoints" / "step-000020").exists()  # its own
    job_id = job.pk
    job.delete()
    # SQLite hands the id of the deleted last row to the next one: its folder must start empty.
    reused = Job.objects.create(
        pk=job_id, owner=alice, name="j2", spec=SPEC, data_source="datasets/x/d.txt", queue="gpu"
    )
    assert claim_folder(reused) == job_layout(job_id)
    assert not (folder / "run").exists()
    # A folder with no owner file (written by an older version, or by hand) is not trusted either.
    (folder / "owner.json").unlink()
    (folder / "stale").mkdir()
    claim_folder(reused)
    assert not (folder / "stale").exists() and (folder / "owner.json").exists()
