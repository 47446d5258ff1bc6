"""Importing a Hugging Face folder as a starting point for jobs, and handing it to the worker that trains one.

An upload is the folder's files in one multipart request, or one ``.zip`` of them (flat, or inside one top-level
folder). Checks, in order, each refusal naming what is at fault: the total size (``CHECKPOINT_MAX_UPLOAD_BYTES``,
413, counted as the files are read, also inside the zip), the file names (JSON, safetensors and a few text files;
a pickle, a ``.bin``/``.pt`` checkpoint or anything else is refused by name, and nothing is ever unpickled), the
``config.json`` (a supported family whose choices the engine has, ``workers.engine.hf``), the spec derived from it
(validated like any other: errors name ``model.*``), and the weights (every tensor the derived model needs, of
its shape). Then the files are stored (local disk or S3) and the row created.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from django.conf import settings
from django.db import models
from django.http import Http404
from pydantic import ValidationError

from builder.checkpoints.models import ImportedCheckpoint
from builder.core.errors import Refusal
from builder.datasets import storage
from builder.datasets.services import check_quota
from workers.engine.hf import (
    ALLOWED_FILES,
    WEIGHTS,
    HFImportError,
    architecture_differences,
    check_folder_files,
    derived_spec,
    engine_state_from_folder,
    read_hf_folder,
)
from workers.engine.spec import load_spec, spec_errors

COPY_BLOCK = 1 << 20
# Files that are well-formed parts of a multipart request but not a folder the engine can take: a rule about the
# data the schema cannot state (422), never a malformed request (400).
UNFIT = 422
CONTENT_TYPES = {".json": "application/json", ".safetensors": "application/octet-stream"}


def own_checkpoints(user: Any) -> models.QuerySet[ImportedCheckpoint]:
    if not user.is_authenticated:
        return ImportedCheckpoint.objects.none()
    return ImportedCheckpoint.objects.filter(owner=user)


def get_own_checkpoint(user: Any, checkpoint_id: int) -> ImportedCheckpoint:
    """The user's own checkpoint; anyone else's (or none) is a 404."""
    found = own_checkpoints(user).filter(pk=checkpoint_id).first()
    if found is None:
        raise Http404("no such checkpoint")
    return found


def _too_large(limit: int) -> Refusal:
    return Refusal("files", f"the checkpoint is over {limit} bytes (CHECKPOINT_MAX_UPLOAD_BYTES)", 413)


def _copy_capped(src: Any, dest: Path, budget: list[int]) -> None:
    """Copy a stream into ``dest``, taking its bytes from ``budget[0]``; 413 when the budget runs out."""
    with dest.open("wb") as out:
        while block := src.read(COPY_BLOCK):
            budget[0] -= len(block)
            if budget[0] < 0:
                raise _too_large(settings.CHECKPOINT_MAX_UPLOAD_BYTES)
            out.write(block)


def _folder_name(raw: str) -> str:
    """A file's name inside the folder (the last part of what the client sent)."""
    return PurePosixPath(raw.replace("\\", "/")).name


def _unzip(archive_path: Path, folder: Path, budget: list[int]) -> None:
    """Extract an uploaded zip: its files flat, or inside one top-level folder. Names are checked before any byte
    is extracted; sizes are counted as they are read (a zip's own size fields are not trusted)."""
    try:
        archive = zipfile.ZipFile(archive_path)
    except zipfile.BadZipFile:
        raise Refusal("files", "not a readable zip file", UNFIT) from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        parts = [PurePosixPath(m.filename).parts for m in members]
        prefixes = {p[0] for p in parts if len(p) == 2}
        names: list[str] = []
        for info, path in zip(members, parts, strict=True):
            if info.filename.startswith("/") or ".." in path or len(path) > 2 or (len(path) == 2 and len(prefixes) > 1):
                raise Refusal(
                    "files", f"{info.filename}: the zip holds one folder's files, nothing nested deeper", UNFIT
                )
            names.append(path[-1])
        if len(set(names)) != len(names):
            raise Refusal("files", "the zip holds two files of the same name", UNFIT)
        _check_names(names)
        if sum(m.file_size for m in members) > budget[0]:
            raise _too_large(settings.CHECKPOINT_MAX_UPLOAD_BYTES)
        for info, name in zip(members, names, strict=True):
            with archive.open(info) as src:
                _copy_capped(src, folder / name, budget)


def _check_names(names: list[str]) -> None:
    try:
        check_folder_files(names)
    except HFImportError as exc:
        raise Refusal("files", f"{exc.field}: {exc.message}", UNFIT) from None


def _stage(uploads: Iterable[Any], folder: Path) -> None:
    """Write the uploaded files (or the one zip's content) into ``folder``, checking names and the size limit."""
    files = list(uploads)
    if not files:
        raise Refusal(
            "files", "send the folder's files (config.json, model.safetensors, tokenizer.json) or a zip", UNFIT
        )
    budget = [settings.CHECKPOINT_MAX_UPLOAD_BYTES]
    if sum(int(f.size) for f in files) > budget[0]:
        raise _too_large(budget[0])
    if len(files) == 1 and _folder_name(files[0].name).lower().endswith(".zip"):
        archive = folder.parent / "upload.zip"
        _copy_capped(files[0], archive, budget)
        _unzip(archive, folder, [settings.CHECKPOINT_MAX_UPLOAD_BYTES])
        return
    names = [_folder_name(f.name) for f in files]
    if len(set(names)) != len(names):
        raise Refusal("files", "two files of the same name", UNFIT)
    _check_names(names)
    for upload, name in zip(files, names, strict=True):
        upload.seek(0)
        _copy_capped(upload, folder / name, budget)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(COPY_BLOCK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_checkpoint(owner: Any, name: str, uploads: Iterable[Any]) -> ImportedCheckpoint:
    """Check, store and record an uploaded folder (see the module docstring); ``Refusal`` naming the problem."""
    with tempfile.TemporaryDirectory(prefix="checkpoint-import-") as tmp:
        folder = Path(tmp) / "folder"
        folder.mkdir()
        _stage(uploads, folder)
        try:
            hf = read_hf_folder(folder)
        except HFImportError as exc:
            field = f"config.{exc.field}" if exc.field not in ALLOWED_FILES else "files"
            raise Refusal(field, exc.message, UNFIT) from None
        if hf.tokenizer is not None:
            _check_tokenizer(hf.tokenizer)
        try:
            spec = load_spec(derived_spec(hf))
        except ValidationError as exc:
            problems = [(f"spec.{e['path']}", f"{e['message']} (derived from config.json)") for e in spec_errors(exc)]
            raise Refusal.of(problems, UNFIT) from None
        try:
            engine_state_from_folder(hf, spec.model)  # every tensor present, of its shape; nothing unpickled
        except HFImportError as exc:
            raise Refusal("files", f"model.safetensors: {exc.field}: {exc.message}", UNFIT) from None

        # The owner's storage quota covers datasets and imported checkpoints together.
        size = sum(path.stat().st_size for path in folder.iterdir())
        held = own_checkpoints(owner).aggregate(total=models.Sum("size_bytes"))["total"] or 0
        check_quota(owner, held + size, field="files")
        weights_sha256 = _sha256(folder / WEIGHTS)
        key = f"checkpoints/user-{owner.pk}/{uuid.uuid4().hex}"
        stored = {}
        for path in sorted(folder.iterdir()):
            content_type = CONTENT_TYPES.get(path.suffix, "text/plain")
            stored[path.name] = storage.save_local_file(f"{key}/{path.name}", path, content_type, move=True)
        return ImportedCheckpoint.objects.create(
            owner=owner,
            name=(name or hf.family)[:200],
            family=hf.family,
            architecture=hf.config.get("architectures", [""])[0] if hf.config.get("architectures") else "",
            config=hf.config,
            spec=spec.model_dump(mode="json"),
            files=stored,
            size_bytes=size,
            weights_sha256=weights_sha256,
            notes=hf.notes,
        )


def _check_tokenizer(path: Path) -> None:
    """A tokenizer the data pipeline can use: it separates documents with ``<eos>`` and pads with ``<pad>``
    (workers.engine.data), so a folder's tokenizer must have them (a report's folder does)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own error types for a malformed file
        raise Refusal("files", f"tokenizer.json: not a readable tokenizer ({exc})", UNFIT) from None
    missing = [token for token in ("<eos>", "<pad>", "<bos>") if tokenizer.token_to_id(token) is None]
    if missing:
        raise Refusal(
            "files",
            f"tokenizer.json has no {', '.join(missing)} token: the training data pipeline needs them; leave the "
            "tokenizer out to train a new one (the token ids then start over)",
            UNFIT,
        )


def check_job_start(checkpoint: ImportedCheckpoint, spec: dict[str, Any]) -> None:
    """Refuse a job spec whose model departs from the checkpoint's architecture (each difference named: the
    weights would not fit), or whose task the checkpoint cannot serve."""
    job_spec = load_spec(spec)
    derived = load_spec(checkpoint.spec).model
    problems = [(f"spec.{path}", message) for path, message in architecture_differences(job_spec.model, derived)]
    devices = getattr(getattr(job_spec.training, "distributed", None), "devices", 1)
    if devices > 1:  # the multi-device launcher does not load a starting checkpoint yet
        problems.append(("spec.training.distributed.devices", "a job that starts from a checkpoint runs on 1 device"))
    if problems:
        raise Refusal.of(problems, UNFIT)


def delete_checkpoint(checkpoint: ImportedCheckpoint) -> None:
    """Delete the row and its stored files; refused (409) while a job starts from it."""
    try:
        checkpoint.delete()
    except models.ProtectedError:
        raise Refusal("", "jobs start from this checkpoint: delete them first", 409) from None
    for name in checkpoint.files.values():
        storage.default_storage.delete(name)


def local_folder(checkpoint: ImportedCheckpoint, dest: Path) -> Path:
    """The checkpoint's folder on this worker (fetched from storage into ``dest`` once; a complete copy is
    reused): what ``workers.engine.train.train(init_from=...)`` reads."""
    marker = dest.with_name(dest.name + ".complete")  # beside the folder: the folder holds the checkpoint's files only
    if marker.is_file() and marker.read_text() == checkpoint.weights_sha256:
        return dest
    marker.unlink(missing_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name, stored in checkpoint.files.items():
        storage.fetch(stored, dest / name)
    marker.write_text(checkpoint.weights_sha256)
    return dest


def starting_folder(job: Any, dest: Path) -> Path | None:
    """The folder of the checkpoint ``job`` starts from, on this worker (None: a random initialisation)."""
    checkpoint = job.init_checkpoint
    return None if checkpoint is None else local_folder(checkpoint, dest)
