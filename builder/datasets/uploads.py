"""Uploads: chunked sessions (what the browser uses) and single multipart requests (small files from the API).

A session reserves its declared size from the owner's quota and assembles the file in a staging folder on the web
host (``DATASET_UPLOAD_DIR``), one chunk per request, so that no request body is ever large: a proxy may queue a whole
request body in memory before Django reads it. Completing a session moves the file into storage (a rename on local
storage, a streamed multipart upload on S3), creates the dataset and queues its validation.
"""

from __future__ import annotations

import fcntl
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.http import Http404
from django.utils import timezone
from django.utils.text import get_valid_filename

from builder.core.errors import Refusal
from builder.datasets import storage
from builder.datasets.models import Dataset, Origin, UploadSession
from builder.datasets.services import check_fields, check_quota, dispatch_analysis
from workers.engine.data import FORMATS, format_from_name

UPLOAD_SESSION_TTL = timedelta(hours=24)
SIMPLE_UPLOAD_TOO_LARGE = (
    "too large for a single-request upload (DATASET_SIMPLE_UPLOAD_MAX_BYTES); send larger files in chunks "
    "through an upload session (POST /api/datasets/uploads)"
)
COPY_BLOCK = 1 << 20


def get_own_session(user: Any, session_id: Any) -> UploadSession:
    try:  # the URL takes any segment, so that a malformed id answers the API's JSON 404 too
        session_id = uuid.UUID(str(session_id))
    except ValueError:
        raise Http404("no such upload") from None
    session = UploadSession.objects.filter(pk=session_id, owner=user).first() if user.is_authenticated else None
    if session is None:
        raise Http404("no such upload")
    return session


def staging_dir() -> Path:
    """Where chunked uploads are assembled (see ``DATASET_UPLOAD_DIR``)."""
    folder = Path(settings.DATASET_UPLOAD_DIR or Path(settings.MEDIA_ROOT) / ".uploads")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def staging_path(session: UploadSession) -> Path:
    return staging_dir() / f"{session.pk}.part"


def resolve_format(filename: str, declared: str) -> str:
    """The declared format, or the one the file name's extension says; ``Refusal`` on the ``format`` field."""
    if declared:
        if declared not in FORMATS:
            raise Refusal("format", f"unknown format {declared!r}; choose one of {', '.join(FORMATS)}")
        return declared
    # Never detect_format(filename): for an unknown extension it would open a file of that name on this server.
    fmt = format_from_name(filename)
    if fmt is None:
        # 422: the name and the (blank) format are each well-formed; together they leave the format unknown.
        raise Refusal(
            "format",
            f"cannot tell the format of {filename!r} from its extension; choose one of {', '.join(FORMATS)}",
            422,
        )
    return fmt


def _expire_stale_sessions(owner: Any) -> None:
    cutoff = timezone.now() - UPLOAD_SESSION_TTL
    for session in UploadSession.objects.filter(owner=owner, dataset__isnull=True, updated_at__lt=cutoff):
        staging_path(session).unlink(missing_ok=True)
        session.delete()


def create_session(owner: Any, data: dict[str, Any]) -> UploadSession:
    """Open a chunked upload of ``data["size"]`` bytes, reserving that much of the owner's quota."""
    size = int(data["size"])
    limit = settings.DATASET_MAX_UPLOAD_BYTES
    if size > limit:
        raise Refusal(
            "size", f"the file is {size} bytes; the largest upload is {limit} (DATASET_MAX_UPLOAD_BYTES)", 413
        )
    filename = data["filename"]
    fmt = resolve_format(filename, data.get("format") or "")
    text_field, label_field = check_fields(fmt, data.get("text_field", "text"), data.get("label_field", ""))
    _expire_stale_sessions(owner)
    with transaction.atomic():
        check_quota(owner, size)
        session = UploadSession.objects.create(
            owner=owner,
            name=data.get("name") or Path(filename).stem[:200] or "dataset",
            description=data.get("description", ""),
            filename=filename,
            format=fmt,
            text_field=text_field,
            label_field=label_field,
            size=size,
        )
    staging_path(session).touch()
    return session


def append_chunk(session: UploadSession, offset: int, length: int, read: Callable[[int], bytes]) -> UploadSession:
    """Write ``length`` bytes from ``read`` at ``offset``, which must be the next byte the session expects.

    Resumable and safe to retry: a chunk is written at its offset (not appended), and a per-session file lock
    serialises concurrent requests, so a repeated or racing chunk can never interleave with another.
    """
    if not session.is_open:
        raise Refusal("", "this upload is already complete", 409)
    if length > settings.DATASET_UPLOAD_CHUNK_BYTES:
        raise Refusal("", f"a chunk is at most {settings.DATASET_UPLOAD_CHUNK_BYTES} bytes, this one is {length}", 413)
    if length <= 0:
        raise Refusal("", "an empty chunk: send the bytes in the request body")
    path = staging_path(session)
    if not path.exists():
        raise Refusal("", "the upload's staging file is gone (the upload expired); start again", 410)
    with path.open("r+b") as part:
        fcntl.flock(part, fcntl.LOCK_EX)  # held until the file closes
        session.refresh_from_db(fields=["received", "size"])
        if offset != session.received:
            raise Refusal("offset", f"expected offset {session.received}, got {offset}", 409, received=session.received)
        if offset + length > session.size:
            raise Refusal("", f"the chunk ends at byte {offset + length}, past the declared size {session.size}", 422)
        part.seek(offset)
        remaining = length
        while remaining:
            block = read(min(COPY_BLOCK, remaining))
            if not block:
                raise Refusal("", f"the request body ended {remaining} bytes short of its Content-Length")
            part.write(block)
            remaining -= len(block)
        part.truncate(offset + length)  # drop anything a failed earlier attempt wrote past this chunk
        part.flush()
        UploadSession.objects.filter(pk=session.pk).update(received=offset + length, updated_at=timezone.now())
        session.received = offset + length
    return session


def _dataset_folder(owner: Any, key: str) -> str:
    return f"datasets/user-{owner.pk}/{key}"


def _safe_filename(filename: str, fmt: str) -> str:
    try:
        safe = get_valid_filename(Path(filename).name)
    except Exception:  # get_valid_filename raises SuspiciousFileOperation for names like ".."
        safe = ""
    return (safe or f"data.{fmt}")[-120:]


def complete_session(session: UploadSession) -> Dataset:
    """Move the assembled file into storage, create its dataset, and queue its validation."""
    if not session.is_open:
        raise Refusal("", "this upload is already complete", 409)
    if session.received != session.size:
        raise Refusal("", f"{session.received} of {session.size} bytes received; send the rest first", 409)
    path = staging_path(session)
    if not path.exists():
        raise Refusal("", "the upload's staging file is gone (the upload expired); start again", 410)
    name = storage.save_local_file(
        f"{_dataset_folder(session.owner, str(session.pk))}/{_safe_filename(session.filename, session.format)}",
        path,
        storage.CONTENT_TYPES[session.format],
        move=True,
    )
    with transaction.atomic():
        dataset = Dataset.objects.create(
            owner=session.owner,
            name=session.name,
            description=session.description,
            origin=Origin.UPLOAD,
            format=session.format,
            text_field=session.text_field,
            label_field=session.label_field,
            original_filename=session.filename,
            file_name=name,
            size_bytes=session.size,
            phase="waiting for a worker to validate it",
        )
        UploadSession.objects.filter(pk=session.pk).update(dataset=dataset)
        dispatch_analysis(dataset)
    return dataset


def abort_session(session: UploadSession) -> None:
    if not session.is_open:
        raise Refusal("", "this upload is already complete; delete its dataset instead", 409)
    staging_path(session).unlink(missing_ok=True)
    session.delete()


def simple_upload(owner: Any, uploaded: Any, data: dict[str, Any]) -> Dataset:
    """One multipart request (small files): staged like a chunked upload, then completed the same way."""
    size = int(uploaded.size)
    if size > settings.DATASET_SIMPLE_UPLOAD_MAX_BYTES:
        raise Refusal("file", SIMPLE_UPLOAD_TOO_LARGE, 413)
    session = create_session(owner, {**data, "filename": data.get("filename") or uploaded.name, "size": size})
    try:
        with staging_path(session).open("wb") as part:
            for chunk in uploaded.chunks(COPY_BLOCK):
                part.write(chunk)
        UploadSession.objects.filter(pk=session.pk).update(received=size)
        session.received = size
        return complete_session(session)
    except BaseException:
        if session.is_open:
            abort_session(session)
        raise
