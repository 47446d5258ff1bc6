"""The engine's metrics sink for the platform: store every point, then stream it.

Points are buffered and flushed about once a second (``async_to_sync`` costs ~7 ms a call here, so a send per
point would slow training): one transaction inserts the batch with consecutive sequence numbers, fenced by the
lease token, then one message goes to the job's Channels group. The database is the record; the stream is best
effort, and a client that sees a gap in the sequence refetches from ``/api/jobs/<id>/metrics?after=<seq>``.

``BackgroundSink`` runs the platform's sinks (this one, TensorBoard, JSON lines) on a thread of their own, so that
the training loop hands each call over and goes on: it never waits for a database transaction, the broker or
TensorBoard's file writes (measured by ``make bench``: the job against the bare engine).
"""

from __future__ import annotations

import copy
import math
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

from django.db import connection, transaction
from django.db.models import F, Max

from builder.core.redaction import hide_server_paths
from builder.jobs import lifecycle
from builder.jobs.files import job_layout
from builder.jobs.models import Job, MetricPoint
from workers.engine.sinks import REPLAY_EVENTS, MetricsSink, latest_points, read_jsonl


def _upsert_sql() -> str:
    """Insert points, replacing the value (and sequence number) of a (job, step, name) already stored.

    Plain SQL rather than ``bulk_create(update_conflicts=True)``: the ORM spends ~3 ms of Python a training step
    compiling 40 rows, in the worker that trains. ``ON CONFLICT ... DO UPDATE`` means the same to SQLite and
    PostgreSQL.
    """
    meta = MetricPoint._meta
    column = {f.name: f.column for f in meta.concrete_fields}
    job, seq, step, name, value = (column[f] for f in ("job", "seq", "step", "name", "value"))
    return (
        f"INSERT INTO {meta.db_table} ({job}, {seq}, {step}, {name}, {value}) VALUES (%s, %s, %s, %s, %s) "
        f"ON CONFLICT ({job}, {step}, {name}) DO UPDATE SET {seq} = excluded.{seq}, {value} = excluded.{value}"
    )


_UPSERT_SQL = _upsert_sql()


class DatabaseStreamSink:
    """Implements the engine's ``MetricsSink`` protocol (``emit``, ``event``, ``close``) for one leased job.

    One attempt of a job: it drops what earlier attempts recorded past the point where this one starts, i.e.
    after the step of the engine's ``resume`` event, or, when the run starts from scratch (its first call is a
    point, not a resume), from that point's step on. The engine's own resume step decides, not the database's
    ``last_checkpoint_step``: a checkpoint can reach the disk a moment before its event reaches the database,
    and the points before it must not be dropped, since they will not be emitted again. For the same reason a
    ``resume`` stores the points before it that the database lacks from the run's JSON lines (``_recover_through``).
    ``flush`` stores the buffered points: the engine calls it (through ``BackgroundSink``) before each checkpoint.
    """

    def __init__(self, lease: lifecycle.Lease, flush_interval: float = 1.0) -> None:
        self.lease = lease
        self.flush_interval = flush_interval
        # Events name local paths (a checkpoint's folder): stored relative to the job's folder (builder.core.redaction).
        self._job_folder = job_layout(lease.job_id).root
        self._buffer: list[tuple[int, str, float]] = []
        self._last_flush = time.monotonic()
        self._started = False
        self.lost = False

    def emit(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self._started:
            self._started = True
            self._truncate_after(step - 1)  # a fresh start: every earlier point from this step on is stale
        for name, value in metrics.items():
            number = float(value)
            # JSON and the charts cannot carry NaN/inf; an anomaly event reports those instead.
            if math.isfinite(number):
                self._buffer.append((step, name, number))
        if time.monotonic() - self._last_flush >= self.flush_interval:
            self.flush()

    def event(self, kind: str, data: Mapping[str, Any], step: int | None = None) -> None:
        # Points first, so that an event never arrives before the points it refers to.
        self.flush()
        event_step = step if step is not None else int(data.get("step", 0) or 0)
        stored = hide_server_paths(_jsonable(data), self._job_folder)
        if not lifecycle.add_event(self.lease.job_id, kind, stored, step=event_step, token=self.lease.token):
            self.lost = True
        if self.lost:
            return
        if kind == "checkpoint":
            Job.objects.filter(pk=self.lease.job_id, lease_token=self.lease.token).update(
                last_checkpoint_step=event_step
            )
        elif kind in REPLAY_EVENTS:
            # The engine went back to a checkpoint and will emit the later steps again: drop them from the
            # record now, so a run that stops before reaching them again keeps no stale points.
            self._started = True
            self._truncate_after(event_step)
            if kind == "resume" and not self.lost:
                self._recover_through(event_step)

    def _recover_through(self, step: int) -> None:
        """Store the points of steps up to ``step`` (where this attempt resumes) that the database lacks, from the
        run's JSON lines.

        The engine emits only the steps after its resume point, so a step the database missed before it would be
        missing for good. Its JSON lines hold every step up to any committed checkpoint: the 1-device path writes
        them first and synchronously, and flushes the record before each commit (the engine's write-ahead
        contract), so there this finds nothing; with several devices rank 0 writes them and this worker only
        follows the file (``builder.jobs.multidevice``), so a worker killed while following loses the points
        since the previous checkpoint event it recorded. Both a replayed step (a rollback) and an earlier attempt
        appear in the file in order: the last line of a step is the one that counts (``latest_points``). Points
        are stored with the same upsert, so a step already stored is rewritten with the same values."""
        stored = MetricPoint.objects.filter(job_id=self.lease.job_id).aggregate(last=Max("step"))["last"] or 0
        if stored >= step:
            return
        try:
            records = read_jsonl(job_layout(self.lease.job_id).run.metrics)
        except FileNotFoundError:
            return
        for point_step, metrics in sorted(latest_points(records).items()):
            if stored <= point_step <= step:  # the stored last step too: its points may span two flushes
                for name, value in metrics.items():
                    number = float(value)  # non-finite values are the strings "nan"/"inf" in the file
                    if math.isfinite(number):
                        self._buffer.append((point_step, name, number))
        self.flush()

    def _truncate_after(self, step: int) -> None:
        """Delete the points after ``step`` (fenced: only while this worker holds the lease)."""
        job_id, token = self.lease.job_id, self.lease.token
        with transaction.atomic():
            # Locking the job row orders this delete against a claim by another worker (PostgreSQL; SQLite
            # transactions are already serialised): a stale worker can never delete the new owner's points.
            if not Job.objects.select_for_update().filter(pk=job_id, lease_token=token).exists():
                self.lost = True
                return
            deleted, _ = MetricPoint.objects.filter(job_id=job_id, step__gt=step).delete()
            if deleted:
                transaction.on_commit(lambda: lifecycle.publish(job_id, {"type": "truncate", "after_step": step}))

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer or self.lost:
            self._buffer.clear()
            return
        # Last value wins within a batch: a step logged twice (e.g. after a rollback) keeps one point.
        latest: dict[tuple[int, str], float] = {}
        for step, name, value in self._buffer:
            latest[(step, name)] = value
        self._buffer.clear()
        job_id, token = self.lease.job_id, self.lease.token
        with transaction.atomic():
            if not Job.objects.filter(pk=job_id, lease_token=token).update(metric_seq=F("metric_seq") + len(latest)):
                self.lost = True
                return
            last = Job.objects.values_list("metric_seq", flat=True).get(pk=job_id)
            first = last - len(latest) + 1
            rows = [
                (job_id, first + i, step, name, value) for i, ((step, name), value) in enumerate(sorted(latest.items()))
            ]
            with connection.cursor() as cursor:
                cursor.executemany(_UPSERT_SQL, rows)
            max_step = max(step for step, _ in latest)
            Job.objects.filter(pk=job_id, step__lt=max_step).update(step=max_step)
            points = [[seq, step, name, value] for _, seq, step, name, value in rows]
            message = {"type": "metrics", "seq_from": first, "seq_to": last, "points": points}
            transaction.on_commit(lambda: lifecycle.publish(job_id, message))

    def close(self) -> None:
        self.flush()


def _jsonable(data: Mapping[str, Any]) -> dict[str, Any]:
    """Events carry floats that may be NaN/inf (an anomaly's loss): store them as strings."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = str(value)
        elif isinstance(value, Mapping):
            out[key] = _jsonable(value)
        else:
            out[key] = value
    return out


class BackgroundSink:
    """Calls ``sink`` from a thread of its own, in the order the trainer made the calls.

    ``emit``/``event`` copy their arguments into a bounded queue and return; when the queue is full (the
    database far behind) they wait, so memory stays bounded and the record is never dropped. An event of a
    kind in ``wait_for`` (checkpoints) waits until it and everything before it went through ``sink`` (the
    database sink stores its buffered points before any event), so that the record holds every point up to
    a checkpoint (the trainer's ``flush`` before committing one waits the same way, so the record already holds
    them when the checkpoint appears on disk). An exception
    raised by ``sink`` is re-raised in the trainer's thread by the next call (or by ``close``), so a broken
    record still fails the run; calls after it are not made. ``close`` drains the queue, closes ``sink`` and
    waits for the thread (which closes its own database connection).
    """

    def __init__(
        self,
        sink: MetricsSink,
        max_pending: int = 10000,
        name: str = "metrics-sink",
        wait_for: frozenset[str] = frozenset({"checkpoint"}),
    ) -> None:
        self._sink = sink
        self._wait_for = wait_for
        self._queue: queue.Queue[tuple[str, tuple[Any, ...], threading.Event | None] | None] = queue.Queue(
            maxsize=max_pending
        )
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def emit(self, step: int, metrics: Mapping[str, float]) -> None:
        self._raise_pending()
        self._queue.put(("emit", (step, dict(metrics)), None))

    def event(self, kind: str, data: Mapping[str, Any]) -> None:
        self._raise_pending()
        if kind not in self._wait_for:
            self._queue.put(("event", (kind, copy.deepcopy(dict(data))), None))
            return
        # A checkpoint is where a crashed run resumes: everything recorded before it must be stored before the
        # trainer goes on (the engine emits no step before its resume point again).
        self._call_and_wait("event", (kind, copy.deepcopy(dict(data))))

    def flush(self) -> None:
        """Wait until every earlier call went through ``sink`` and ``sink.flush()`` returned: the trainer calls
        this before committing a checkpoint (the engine's write-ahead contract, ``workers.engine.sinks``)."""
        self._raise_pending()
        self._call_and_wait("flush", ())

    def _call_and_wait(self, method: str, args: tuple[Any, ...]) -> None:
        done = threading.Event()
        self._queue.put((method, args, done))
        done.wait()
        self._raise_pending()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        failed = False
        try:
            while (item := self._queue.get()) is not None:
                method, args, done = item
                if not failed:  # after a failure: drain, the trainer is about to hear of it and stop
                    try:
                        getattr(self._sink, method)(*args)
                    except BaseException as exc:  # handed to the trainer's thread, which decides
                        self._error, failed = exc, True
                if done is not None:
                    done.set()
            try:
                self._sink.close()
            except BaseException as exc:
                self._error = self._error or exc
        finally:
            connection.close()  # this thread's own database connection
