"""Run one claimed job on this worker: the orchestration behind the thin ``jobs.train`` task (``workers.tasks.jobs``).

Claim the job (a conditional update that yields a fencing token), heartbeat from a side thread, build the sink
(database + Channels stream, TensorBoard, JSON lines, all written from a background thread), call the engine, and
record the outcome. A later attempt (after a crash, a preemption or a resume) calls the same function: the engine
resumes from the last checkpoint with a manifest in the job's folder, so the task is idempotent.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection

from builder.checkpoints.services import starting_folder
from builder.core.durable import Heartbeat
from builder.core.redaction import describe_failure, hide_server_paths
from builder.jobs import lifecycle
from builder.jobs.files import claim_folder, resolve_data
from builder.jobs.models import Job, JobState
from builder.jobs.multidevice import train_on_devices
from builder.jobs.remote import mirrored, restore, store_prepared
from builder.jobs.signals import job_succeeded
from builder.jobs.sink import BackgroundSink, DatabaseStreamSink
from workers.engine.spec import load_spec

log = logging.getLogger(__name__)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_job(job_id: int, worker: str) -> dict[str, Any]:
    """Claim and train the job fair share runs next on ``job_id``'s class (``lifecycle.claim``: usually ``job_id``);
    returns a small JSON-able summary for the task result.

    Two phases, each announced by an event so that the dashboard can say what is happening: ``preparing``
    (tokenizing the dataset: minutes on a large corpus, with no step to show) then ``data_ready`` (with the
    token counts and how long it took), then training. The preparation is cached in the job's folder, so a later
    attempt skips it.
    """
    from workers.engine.data import prepare
    from workers.engine.sinks import FanoutSink, JsonlSink, TensorBoardSink
    from workers.engine.train import initial_tokenizer, train

    close_old_connections()
    lease = lifecycle.claim(job_id, worker)
    if lease is None:
        return {"job": job_id, "outcome": "not claimable"}
    job_id = lease.job_id  # fair share may have handed this delivery another queued job of the class
    job = Job.objects.select_related("dataset").get(pk=job_id)
    spec = load_spec(job.spec)
    layout = claim_folder(job)
    # Remote storage: the folder gets what storage holds (the newest stored checkpoint, the tokenized data, the
    # events), so that this host resumes a job another host ran. Raised here, the attempt is retried. The lease is
    # renewed meanwhile: a large checkpoint can take longer to fetch than JOB_LEASE_SECONDS.
    with Heartbeat(lifecycle.JOBS, lease, settings.JOB_HEARTBEAT_SECONDS):
        restore(job, layout)
    run = layout.run
    Job.objects.filter(pk=job_id, lease_token=lease.token).update(total_steps=spec.training.max_steps)

    stream = DatabaseStreamSink(lease)
    # What a lost attempt wrote past the checkpoint this one resumes from is dropped by the engine's ``resume``
    # event (the database sink deletes those points, TensorBoard's writer purges those steps), not from the
    # claim's ``resume_from``: that is the row's last_checkpoint_step, which lags the checkpoint resumed from when
    # a worker died between committing a checkpoint and recording it; purging after it would drop the steps in
    # between, which this attempt does not write again.
    # Remote storage: each checkpoint is stored before the database records it (builder.jobs.remote).
    platform = BackgroundSink(
        mirrored(
            FanoutSink(stream, TensorBoardSink(run.tensorboard)),
            layout,
            lease,
            record_points=stream.flush,
        )
    )
    sink = FanoutSink(
        # The local JSON lines first and in this thread (cheap): the file is always at least as far as any
        # checkpoint. The database + stream and TensorBoard on a thread of their own: the training loop never
        # waits for a transaction, the broker or TensorBoard's writes, except at checkpoints (see BackgroundSink).
        JsonlSink(run.metrics),
        platform,
    )
    beat = Heartbeat(lifecycle.JOBS, lease, settings.JOB_HEARTBEAT_SECONDS)
    beat.start()

    # Checked before every step, so that a cancel stops the run within a step: one indexed read, written as
    # plain SQL because building the ORM query each time costs more than the query (~0.5 ms a step here).
    cancel_sql = f"SELECT cancel_requested FROM {Job._meta.db_table} WHERE id = %s"

    def lease_lost() -> bool:
        return beat.lost.is_set() or stream.lost

    def cancel_requested() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(cancel_sql, [job_id])
            row = cursor.fetchone()
        return row is None or bool(row[0])

    def should_stop() -> bool:
        # A lost lease: the lease moved on, stop at once, writing nothing more.
        return lease_lost() or cancel_requested()

    try:
        data_path = resolve_data(job, layout)
        began = time.perf_counter()
        lifecycle.add_event(job_id, "preparing", {"source": job.data_source}, token=lease.token)
        # The same per-example limit as the dataset's validation: one huge line cannot exhaust the worker either.
        # A job that starts from an imported checkpoint: its folder on this worker (weights, tokenizer).
        init_from = starting_folder(job, layout.root / "init")
        prepared = prepare(
            spec,
            data_path,
            run.prepared_data,
            max_example_bytes=settings.DATASET_MAX_EXAMPLE_BYTES,
            tokenizer_file=initial_tokenizer(init_from),
        )
        store_prepared(job_id, run.prepared_data)  # remote storage: another host resumes without tokenizing again
        splits = prepared.meta.get("splits", {})
        lifecycle.add_event(
            job_id,
            "data_ready",
            {
                "seconds": round(time.perf_counter() - began, 3),
                "train_tokens": splits.get("train", {}).get("tokens"),
                "val_tokens": splits.get("val", {}).get("tokens"),
                "vocab_size": prepared.vocab_size,
            },
            token=lease.token,
        )
        began = time.perf_counter()
        if spec.training.distributed.devices > 1:
            # The ranks write rank 0's points to the JSON lines file themselves; the runner tails them to `platform`.
            result = train_on_devices(
                job_id,
                lease,
                spec,
                run,
                platform,
                lease_lost=lease_lost,
                cancel_requested=cancel_requested,
                device=_device(),
            )
        else:
            result = train(
                spec,
                prepared,
                run.root,
                sink,
                resume=True,
                should_stop=should_stop,
                device=_device(),
                init_from=init_from,
            )
        sink.close()  # the last writes drain before the outcome is recorded: they are part of the run's cost
        train_seconds = time.perf_counter() - began
    except Exception as exc:
        log.exception("job %s failed", job_id)
        try:
            sink.close()
        except Exception:  # the same failure, raised again by the sink: already being reported
            log.warning("job %s: the metrics sink failed while closing", job_id, exc_info=True)
        beat.stop()
        message = describe_failure(exc)
        # For the job's owner: what failed and where in the code, without the server's paths (builder.core.redaction).
        trace = hide_server_paths(traceback.format_exc(limit=8), layout.root)
        lifecycle.add_event(job_id, "error", {"message": message, "traceback": trace}, token=lease.token)
        lifecycle.transition(job_id, JobState.FAILED, token=lease.token, reason=message, error=message)
        return {"job": job_id, "outcome": "failed", "error": message}
    beat.stop()
    return record_outcome(job_id, lease, result, lost=beat.lost.is_set() or stream.lost, train_seconds=train_seconds)


def record_outcome(
    job_id: int, lease: lifecycle.Lease, result: Any, lost: bool, train_seconds: float | None = None
) -> dict[str, Any]:
    """Map the engine's result onto the job's state (fenced: a worker that lost the lease records nothing).

    ``train_seconds`` is how long this attempt's ``train()`` call and the last metric writes took (data
    preparation excluded). The summary names the last checkpoint by its step (``checkpoint_step``), never by its
    folder on this worker: the summary is the job's ``result``, which the API shows.
    """
    from workers.engine.checkpoint import checkpoint_step

    status = result.status
    summary = {
        "status": status,
        "step": result.step,
        "best_val_loss": result.best_val_loss,
        "checkpoint_step": checkpoint_step(result.checkpoint) if result.checkpoint else None,
        "reason": hide_server_paths(result.reason),
        "train_seconds": None if train_seconds is None else round(train_seconds, 3),
    }
    if lost:
        return {"job": job_id, "outcome": "lease lost", **summary}
    fields = {"result": summary, "step": result.step}
    if status in ("completed", "early_stopped"):
        reason = result.reason or status
        if lifecycle.transition(job_id, JobState.SUCCEEDED, token=lease.token, reason=reason, **fields):
            # The success is committed: apps that act on it (the reports app queues the evaluation) listen.
            job_succeeded.send(sender=Job, job_id=job_id)
    elif status == "stopped":
        reason = lifecycle.cancel_reason(job_id)  # the owner's, or e.g. a sweep's pruner
        lifecycle.transition(job_id, JobState.CANCELLED, token=lease.token, reason=reason, **fields)
    elif status == "preempted":
        # The worker is shutting down: record the preemption, then queue the job again so that another worker
        # (or this one, restarted) continues from the checkpoint just written.
        if lifecycle.transition(job_id, JobState.PREEMPTED, token=lease.token, reason="worker shutting down", **fields):
            job = Job.objects.get(pk=job_id)
            if lifecycle.transition(job_id, JobState.QUEUED, reason="re-queued after preemption"):
                lifecycle.dispatch(job)
    else:
        lifecycle.transition(
            job_id, JobState.FAILED, token=lease.token, reason=result.reason or status, error=result.reason, **fields
        )
    return {"job": job_id, "outcome": status, **summary}
