"""A job's folder kept in object storage, so that hosts share nothing but the database, Redis and the bucket.

With remote storage (``S3_BUCKET``: S3 through django-storages), everything a job leaves lives under its prefix,
with the names of its folder on a worker (``workers.engine.layout.JobLayout``)::

    jobs/job-<id>/owner.json                   which job row the prefix belongs to (as on disk)
    jobs/job-<id>/run/checkpoints/step-N/...   committed checkpoints: their manifest.json is stored last
    jobs/job-<id>/run/data/...                 the tokenized data; its COMPLETE marker is stored last
    jobs/job-<id>/run/tensorboard/...          TensorBoard events (at every checkpoint and at the end)
    jobs/job-<id>/run/metrics.jsonl            the run's JSON lines (likewise)

The engine still writes into a local folder and knows nothing of storage; this module moves that folder's
contents. On a worker, ``restore`` fills the job's folder from storage before training (the newest checkpoint
stored with its manifest, when newer than the folder's own, the tokenized data, the events), so any host resumes
any job; ``mirrored`` wraps the run's record sink so that every committed checkpoint is stored before the record
hears of it (``last_checkpoint_step`` never names a checkpoint storage lacks), and only after the records of its
steps (the points, the events, the JSON lines): a worker killed in between leaves storage a checkpoint newer than
``last_checkpoint_step``, which the next host resumes from. Storage keeps the checkpoints the folder keeps;
``store_prepared`` stores the tokenized data once. On any host, ``local_checkpoint`` gives a verified local copy
of a stored checkpoint and its run's data (reports, the playground), and ``tensorboard_archive`` streams the
stored events as a tar.gz. The folder under ``JOBS_WORK_DIR`` is then a cache.

With local storage (the embedded default) every function here leaves things as they were: the job's folder under
``JOBS_WORK_DIR`` is the record, and the web server reads it (one machine, or a shared disk).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages

from builder.datasets.storage import COPY_CHUNK, is_local
from builder.jobs import lifecycle
from builder.jobs.files import job_layout, owner_key
from builder.jobs.models import Job
from workers.engine.checkpoint import (
    MANIFEST,
    CheckpointError,
    checkpoint_dir_name,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from workers.engine.layout import JobLayout, RunLayout
from workers.engine.sinks import MetricsSink

log = logging.getLogger(__name__)

# The tokenized data's completion marker (``workers.engine.data``): stored last, fetched last.
PREPARED_MARKER = "COMPLETE"
# What the playground needs of the run's data (the report needs all of it).
INFERENCE_DATA = ("tokenizer.json", "labels.json")
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_storage_cache: dict[str, Storage] = {}


def is_mirrored() -> bool:
    """True when jobs keep their files in remote storage (S3), False with local storage (the default)."""
    return not is_local()


def job_prefix(job_id: int) -> str:
    """The storage prefix of everything job ``job_id`` leaves (below ``S3_PREFIX``)."""
    return f"jobs/job-{job_id}"


def _key(job_id: int, relative: str | Path) -> str:
    return f"{job_prefix(job_id)}/{Path(relative).as_posix()}"


def _store() -> Storage:
    """The default storage's backend with the same options, except that a name is replaced, not renamed: a job's
    files keep their names (``file_overwrite`` is off for the default storage, where uploads must never replace
    someone's data)."""
    config = dict(settings.STORAGES["default"])
    config["OPTIONS"] = {**config.get("OPTIONS", {}), "file_overwrite": True}
    signature = json.dumps(config, sort_keys=True, default=str)
    store = _storage_cache.get(signature)
    if store is None:
        store = _storage_cache[signature] = storages.create_storage(config)
    return store


# --------------------------------------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------------------------------------


def _put_file(store: Storage, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
    with path.open("rb") as fh:
        content = File(fh, name=path.name)
        content.content_type = content_type  # type: ignore[attr-defined]  # read by S3Storage (moto needs one)
        store.save(key, content)


def _put_bytes(store: Storage, key: str, data: bytes, content_type: str = "application/json") -> None:
    content = ContentFile(data, name=Path(key).name)
    content.content_type = content_type  # type: ignore[attr-defined]
    store.save(key, content)


def _read(store: Storage, key: str) -> bytes | None:
    """The object's bytes, or None when there is none."""
    try:
        with store.open(key, "rb") as fh:
            data: bytes = fh.read()
            return data
    except FileNotFoundError:
        return None


def _fetch(store: Storage, key: str, dest: Path) -> None:
    """Stream the object into ``dest`` through a ``.part`` sibling, so a cut copy is never taken for a whole one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.part-{uuid.uuid4().hex[:8]}")
    try:
        with store.open(key, "rb") as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, COPY_CHUNK)
        partial.rename(dest)
    finally:
        partial.unlink(missing_ok=True)


def _files(store: Storage, prefix: str) -> list[str]:
    """Names of the objects directly under ``prefix`` (no sub-prefixes)."""
    try:
        return sorted(store.listdir(prefix)[1])
    except FileNotFoundError:
        return []


def _delete_tree(store: Storage, prefix: str) -> None:
    dirs, files = store.listdir(prefix)
    for name in files:
        store.delete(f"{prefix}/{name}")
    for name in dirs:
        _delete_tree(store, f"{prefix}/{name}")


def stored_checkpoint_steps(job_id: int) -> list[int] | None:
    """Steps of the checkpoints stored for ``job_id`` with their manifest, oldest first; None with local storage."""
    if not is_mirrored():
        return None
    store = _store()
    root = _key(job_id, "run/checkpoints")
    try:
        dirs = store.listdir(root)[0]
    except FileNotFoundError:
        return []
    steps = []
    for name in dirs:
        match = _STEP_DIR.match(name)
        if match and MANIFEST in _files(store, f"{root}/{name}"):
            steps.append(int(match.group(1)))
    return sorted(steps)


# --------------------------------------------------------------------------------------------------------
# Worker side: store what the run writes, restore it on another host
# --------------------------------------------------------------------------------------------------------


def store_checkpoint(job_id: int, checkpoint: Path) -> None:
    """Store the committed local checkpoint ``checkpoint``: its files, then its manifest (the commit in storage);
    then delete from storage the checkpoints the local folder no longer keeps (manifest first, so a prune cut
    short leaves no checkpoint that looks committed)."""
    store = _store()
    run = RunLayout.of_checkpoint(checkpoint)
    prefix = _key(job_id, f"run/checkpoints/{checkpoint.name}")
    # A step stored again (after a rollback) is not committed in storage until its new manifest is there.
    store.delete(f"{prefix}/{MANIFEST}")
    # Every file, in sub-folders too (a sharded checkpoint has them); the manifest names them the same way.
    for path in sorted(checkpoint.rglob("*")):
        relative = path.relative_to(checkpoint).as_posix()
        if path.is_file() and relative != MANIFEST:
            _put_file(store, f"{prefix}/{relative}", path)
    _put_file(store, f"{prefix}/{MANIFEST}", checkpoint / MANIFEST, "application/json")
    kept = {path.name for path in list_checkpoints(run.checkpoints)} | {checkpoint.name}
    root = _key(job_id, "run/checkpoints")
    for name in store.listdir(root)[0]:
        if _STEP_DIR.match(name) and name not in kept:
            store.delete(f"{root}/{name}/{MANIFEST}")
            _delete_tree(store, f"{root}/{name}")


def store_prepared(job_id: int, prepared: Path) -> None:
    """Store the run's tokenized data (``prepared``), once per preparation: its files, then its marker."""
    if not is_mirrored():
        return
    store = _store()
    prefix = _key(job_id, "run/data")
    marker = (prepared / PREPARED_MARKER).read_bytes()
    if _read(store, f"{prefix}/{PREPARED_MARKER}") == marker:
        return
    store.delete(f"{prefix}/{PREPARED_MARKER}")
    for path in sorted(prepared.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name != PREPARED_MARKER:
            _put_file(store, f"{prefix}/{path.name}", path)
    _put_bytes(store, f"{prefix}/{PREPARED_MARKER}", marker, "text/plain")


def _store_changed(store: Storage, job_id: int, layout: JobLayout, sent: dict[str, tuple[int, int]]) -> None:
    """Store the run's TensorBoard events and JSON lines that changed since they were last sent (``sent``)."""
    run = layout.run
    paths = [run.metrics] if run.metrics.is_file() else []
    if run.tensorboard.is_dir():
        paths += sorted(p for p in run.tensorboard.iterdir() if p.is_file())
    for path in paths:
        stat = path.stat()
        relative = path.relative_to(layout.root).as_posix()
        if sent.get(relative) != (stat.st_size, stat.st_mtime_ns):
            _put_file(store, _key(job_id, relative), path)
            sent[relative] = (stat.st_size, stat.st_mtime_ns)


class MirroringSink:
    """Wraps a job's record sink (``MetricsSink``): a ``checkpoint`` event stores the events and JSON lines written
    so far, then that checkpoint, before ``sink`` records it; ``close`` stores the events and JSON lines once
    ``sink`` has closed (TensorBoard's last writes flushed). Nothing is stored once the lease is lost: the job has
    moved on to another worker, which owns the prefix now. A failed upload fails the run, as a broken record does.

    ``record_points`` (the database sink's ``flush``) runs before a checkpoint is stored, and the TensorBoard events
    and JSON lines are stored before it too: once stored, another host may resume from it and writes only the
    steps after it, so every record of its steps must already be where that host finds them. Otherwise a worker
    killed between storing the checkpoint and the rest loses the steps since its previous checkpoint (seen: steps
    6-10 of a run resumed at step 10 on another host, missing from the database, later from TensorBoard)."""

    def __init__(
        self,
        sink: MetricsSink,
        layout: JobLayout,
        lease: lifecycle.Lease,
        record_points: Callable[[], None] | None = None,
    ) -> None:
        self._sink = sink
        self._record_points = record_points
        self._layout = layout
        self._lease = lease
        self._job_id = lease.job_id
        self._sent: dict[str, tuple[int, int]] = {}

    def _held(self) -> bool:
        return lifecycle.JOBS.mine(self._lease).exists()

    def emit(self, step: int, metrics: Mapping[str, float]) -> None:
        self._sink.emit(step, metrics)

    def event(self, kind: str, data: Mapping[str, Any]) -> None:
        if kind == "checkpoint" and self._held():
            if self._record_points is not None:
                self._record_points()
            store = _store()
            began = time.perf_counter()
            # The events and JSON lines first: once its manifest is stored, another host may resume from this
            # checkpoint, and it keeps this host's stored TensorBoard file and JSON lines as they are then (it
            # writes only the steps after the checkpoint). Both files already hold every step up to it: the
            # TensorBoard sink flushes each step, and the JSON lines are written, flushed, before this call.
            _store_changed(store, self._job_id, self._layout, self._sent)
            store_checkpoint(self._job_id, self._layout.run.checkpoint(int(data["step"])))
            data = {**data, "stored_seconds": round(time.perf_counter() - began, 3)}
        self._sink.event(kind, data)

    def flush(self) -> None:
        self._sink.flush()

    def close(self) -> None:
        self._sink.close()
        if self._held():
            _store_changed(_store(), self._job_id, self._layout, self._sent)


def mirrored(
    sink: MetricsSink, layout: JobLayout, lease: lifecycle.Lease, record_points: Callable[[], None] | None = None
) -> MetricsSink:
    """``sink`` wrapped by a ``MirroringSink`` with remote storage; ``sink`` itself with local storage."""
    return MirroringSink(sink, layout, lease, record_points) if is_mirrored() else sink


def _fetch_checkpoint(store: Storage, job_id: int, step: int, checkpoints: Path) -> Path | None:
    """Copy the stored checkpoint of ``step`` into the local folder ``checkpoints`` with the engine's commit
    protocol (files into a scratch folder, the manifest last, a rename), then verify it against its manifest.
    None when storage has no committed checkpoint of that step or the copy does not verify."""
    prefix = _key(job_id, f"run/checkpoints/{checkpoint_dir_name(step)}")
    raw = _read(store, f"{prefix}/{MANIFEST}")
    if raw is None:
        return None
    manifest = json.loads(raw)
    name = checkpoint_dir_name(step)
    checkpoints.mkdir(parents=True, exist_ok=True)
    # The engine's scratch names (``.tmp-step-``/``.trash-step-``): its next commit removes any a crash left.
    scratch = checkpoints / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    scratch.mkdir()
    try:
        for file in manifest["files"]:
            _fetch(store, f"{prefix}/{file}", scratch / file)
        (scratch / MANIFEST).write_bytes(raw)
        final = checkpoints / name
        trash = checkpoints / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        if final.exists():
            final.rename(trash)
        scratch.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        verify_checkpoint(final, check_hashes=True)
    except CheckpointError:
        log.warning("job %s: the stored checkpoint of step %s does not verify", job_id, step, exc_info=True)
        shutil.rmtree(final, ignore_errors=True)
        return None
    return final


def _fetch_prepared(store: Storage, job_id: int, dest: Path, names: tuple[str, ...] | None = None) -> bool:
    """Copy the stored tokenized data into ``dest``: ``names`` only (the marker is then not copied), or all of
    it with the marker last. False when storage holds no complete preparation."""
    prefix = _key(job_id, "run/data")
    marker = _read(store, f"{prefix}/{PREPARED_MARKER}")
    if marker is None:
        return False
    stored = [n for n in _files(store, prefix) if n != PREPARED_MARKER]
    for name in stored if names is None else [n for n in names if n in stored]:
        _fetch(store, f"{prefix}/{name}", dest / name)
    if names is None:
        (dest / PREPARED_MARKER).write_bytes(marker)
    return True


def restore(job: Job, layout: JobLayout) -> int | None:
    """Make the job's folder (just claimed, ``builder.jobs.files.claim_folder``) hold what storage holds, so the
    engine resumes from the newest stored checkpoint on this host too; returns the step of the checkpoint
    fetched (None: none newer than the folder's own, or local storage).

    Storage whose ``owner.json`` names another row with the same id (SQLite reuses a deleted last id) is emptied
    first, as the folder is. Fetched: the newest checkpoint stored with its manifest, when the folder has none as
    new; the tokenized data, when the folder has none; TensorBoard event files the folder lacks; the JSON lines
    when the folder lacks them or a checkpoint was fetched (another host went further).
    """
    if not is_mirrored():
        return None
    store = _store()
    key = owner_key(job)
    raw = _read(store, _key(job.pk, "owner.json"))
    stored = json.loads(raw) if raw else None
    if stored != key:
        if stored is not None:
            log.warning("job %s: removing stored files left by an earlier job with the same id (%s)", job.pk, stored)
            _delete_tree(store, job_prefix(job.pk))
        _put_bytes(store, _key(job.pk, "owner.json"), json.dumps(key).encode())
        return None
    run = layout.run
    if not (run.prepared_data / PREPARED_MARKER).is_file():
        _fetch_prepared(store, job.pk, run.prepared_data)
    local = latest_checkpoint(run.checkpoints)
    local_step = -1 if local is None else checkpoint_step(local)
    fetched = None
    for step in reversed(stored_checkpoint_steps(job.pk) or []):
        if step <= local_step:
            break
        if _fetch_checkpoint(store, job.pk, step, run.checkpoints) is not None:
            log.info("job %s: fetched the checkpoint of step %s from storage", job.pk, step)
            fetched = step
            break
    # TensorBoard files are one per writer: those this host wrote are its own, at least as long as their stored
    # copies. The JSON lines are one file for every attempt: when another host went further (its checkpoint was
    # fetched), the stored file holds that host's lines and is taken instead of this host's older one.
    events = [f"run/tensorboard/{name}" for name in _files(store, _key(job.pk, "run/tensorboard"))]
    for relative in [*events, "run/metrics.jsonl"]:
        replace = fetched is not None and relative == "run/metrics.jsonl"
        if replace or not (layout.root / relative).exists():
            with contextlib.suppress(FileNotFoundError):
                _fetch(store, _key(job.pk, relative), layout.root / relative)
    return fetched


# --------------------------------------------------------------------------------------------------------
# Any host: a stored checkpoint to read, the stored events to download
# --------------------------------------------------------------------------------------------------------


def cache_layout(job_id: int) -> JobLayout:
    """Where a host keeps copies of job ``job_id``'s stored files it did not write (reports, the playground)."""
    return JobLayout(Path(settings.JOBS_WORK_DIR) / ".cache" / f"job-{job_id}")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One copier per cache folder on this host (processes and threads alike); released if the holder dies."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def local_checkpoint(job_id: int, step: int, *, all_data: bool = False) -> Path:
    """A local folder holding job ``job_id``'s checkpoint of ``step``, with its run's data beside it
    (``RunLayout.of_checkpoint(path).prepared_data``): the tokenizer and labels, or with ``all_data`` the whole
    tokenized data (an evaluation reads it).

    Local storage: the job's folder under ``JOBS_WORK_DIR``, as the trainer wrote it. Remote storage: the job's
    own folder when it holds the very checkpoint stored (the same manifest), else a copy in ``cache_layout``,
    fetched (and verified) when it is missing or differs from the stored one. The path may not exist: no such
    checkpoint is kept (callers say so).
    """
    own = job_layout(job_id).run.checkpoint(step)
    if not is_mirrored():
        return own
    store = _store()
    stored = _read(store, _key(job_id, f"run/checkpoints/{checkpoint_dir_name(step)}/{MANIFEST}"))
    cache = cache_layout(job_id)
    cached = cache.run.checkpoint(step)
    if stored is None:
        # Not in the bucket: a job that ran before S3 was set up, on this host, is still read from its folder.
        return own if own.is_dir() else cached
    if _same_file(own / MANIFEST, stored) and (own.parent.parent / "data" / PREPARED_MARKER).is_file():
        return own
    with _locked(cache.root):
        if not _same_file(cached / MANIFEST, stored):
            fetched = _fetch_checkpoint(store, job_id, step, cache.run.checkpoints)
            if fetched is None:
                return cached
            # The data of a checkpoint fetched again may be another run's (a reused id): fetch it again too.
            shutil.rmtree(cache.run.prepared_data, ignore_errors=True)
        data = cache.run.prepared_data
        if all_data and not (data / PREPARED_MARKER).is_file():
            _fetch_prepared(store, job_id, data)
        elif not all(n == "labels.json" or (data / n).is_file() for n in INFERENCE_DATA):
            _fetch_prepared(store, job_id, data, INFERENCE_DATA)
    return cached


def _same_file(path: Path, content: bytes) -> bool:
    try:
        return path.read_bytes() == content
    except OSError:
        return False


class _Chunks:
    """A write-only file whose writes are taken out in chunks (a tar stream's output)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def tensorboard_files(job_id: int) -> list[str]:
    """Names of job ``job_id``'s stored TensorBoard event files."""
    return _files(_store(), _key(job_id, "run/tensorboard"))


async def off_the_event_loop(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` as an async iterator whose every step runs on a worker thread: the ASGI server streams it chunk by
    chunk (Django would read a synchronous iterator into memory whole before sending any of it)."""

    def next_chunk() -> bytes | None:
        return next(chunks, None)

    while (chunk := await sync_to_async(next_chunk, thread_sensitive=False)()) is not None:
        yield chunk


def tensorboard_archive(job_id: int, names: list[str], folder: str) -> Iterator[bytes]:
    """The stored TensorBoard files ``names`` of job ``job_id`` as a tar.gz stream (one file in memory at most),
    each under ``folder/`` in the archive."""
    store = _store()
    out = _Chunks()
    with tarfile.open(fileobj=out, mode="w|gz") as archive:  # type: ignore[call-overload]  # any object with write()
        for name in names:
            with store.open(_key(job_id, f"run/tensorboard/{name}"), "rb") as fh:
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = fh.size
                info.mtime = int(time.time())
                archive.addfile(info, fh)
            yield out.take()
    yield out.take()
