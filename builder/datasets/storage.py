"""Dataset files through Django's storage API (``default_storage``): the local disk or S3, the same for web and workers.

The readers need local files, so ``local_copy`` gives one: the file itself on local storage, a streamed temporary
copy (1 MiB at a time) of a remote object otherwise. ``save_local_file`` is the reverse; ``download_response``
serves a file to its reader: streamed from the local disk, or a redirect to a short-lived presigned URL on S3
(the object never passes through the web process).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.http import FileResponse, HttpResponseRedirect
from django.http.response import HttpResponseBase

COPY_CHUNK = 1 << 20
CONTENT_TYPES = {"jsonl": "application/jsonl", "csv": "text/csv", "txt": "text/plain"}


class _LocalFile(File):
    """A file on this machine. ``temporary_file_path`` lets FileSystemStorage move it (a rename on one disk)
    instead of copying it; S3Storage streams it with a multipart upload and the explicit content type."""

    def __init__(self, path: Path, content_type: str) -> None:
        super().__init__(path.open("rb"), name=path.name)
        self._path = path
        self.content_type = content_type

    def temporary_file_path(self) -> str:
        return str(self._path)


def is_local() -> bool:
    """True when storage names map to files on this machine (FileSystemStorage)."""
    try:
        default_storage.path("probe")
    except NotImplementedError:
        return False
    return True


def save_local_file(name: str, path: Path, content_type: str = "application/octet-stream", move: bool = False) -> str:
    """Store the local file ``path`` under ``name`` (or a free variant of it); returns the name actually used.

    ``move``: the caller gives the file away; on local storage it is renamed into place when possible.
    """
    if move and is_local():
        with _LocalFile(path, content_type) as content:
            return default_storage.save(name, content)
    with path.open("rb") as fh:
        stream = File(fh, name=path.name)
        stream.content_type = content_type  # type: ignore[attr-defined]  # read by S3Storage
        saved = default_storage.save(name, stream)
    if move:
        path.unlink(missing_ok=True)
    return saved


def local_path(name: str) -> Path | None:
    """The file behind the stored name ``name`` when storage is the local disk, else None."""
    try:
        return Path(default_storage.path(name))
    except NotImplementedError:
        return None


def fetch(name: str, dest: Path) -> Path:
    """Stream the stored object ``name`` into the local file ``dest`` (1 MiB at a time) and return ``dest``.

    Written to a ``.part`` sibling first and renamed, so a copy cut short is never mistaken for a whole one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    with default_storage.open(name, "rb") as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, COPY_CHUNK)
    partial.rename(dest)
    return dest


@contextlib.contextmanager
def local_copy(name: str) -> Iterator[Path]:
    """A local path holding the stored file ``name`` for the duration of the ``with`` block."""
    path = local_path(name)
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="dataset-") as tmp:
        yield fetch(name, Path(tmp) / (Path(name).name or "data"))


def delete_quietly(names: list[str]) -> None:
    """Remove stored files; one that is already gone is not an error (deletes are retried after failures)."""
    for name in names:
        if name:
            default_storage.delete(name)


def download_response(name: str, filename: str, content_type: str = "application/octet-stream") -> HttpResponseBase:
    """The stored file as an attachment: streamed from local disk, or a redirect to a presigned S3 URL."""
    try:
        path = Path(default_storage.path(name))
    except NotImplementedError:
        quoted = filename.replace('"', "")
        disposition = f'attachment; filename="{quoted}"'
        url = default_storage.url(  # type: ignore[call-arg]  # S3Storage.url takes parameters and expire
            name,
            parameters={"ResponseContentDisposition": disposition, "ResponseContentType": content_type},
            expire=settings.S3_PRESIGNED_URL_SECONDS,
        )
        redirect = HttpResponseRedirect(url)
        redirect["Cache-Control"] = "no-store"  # the URL expires; never cache the redirect
        return redirect
    return FileResponse(path.open("rb"), as_attachment=True, filename=filename, content_type=content_type)
