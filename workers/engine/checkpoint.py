"""Checkpoints: everything the next step needs, committed atomically, verified before use.

A checkpoint is a directory ``<root>/step-000123/`` holding:

- ``model.safetensors``: the model's ``state_dict`` (parameters and persistent buffers, so the aux-free
  router biases); tied weights are stored once (``safetensors.torch.save_model``).
- ``optimizer.pt``: ``{"optimizer": ..., "scaler": ...}``: the optimizer's ``state_dict()`` (one torch optimizer's,
  or ``{part: state dict}`` for Muon's ``OptimizerSet``) and the fp16 ``GradScaler``'s (else None).
- ``rng.pt``: Python, NumPy, torch CPU and (when present) every CUDA generator's state.
- ``state.json``: ``{"step", "loop": <trainer loop state>, "data": <data cursor>}``.
- ``spec.json``: the ``Spec`` the run used.
- ``manifest.json``: ``{"format", "step", "created", "files": {name: {"sha256", "bytes"}}}``.

Commit protocol (torchtitan's, simplified to one writer): the files are written into a hidden temporary
directory and fsynced; the manifest is written last (temp file, fsync, rename); the directory is renamed
to its final name and the parent fsynced. Only then are older checkpoints pruned to the newest ``keep``.
A reader accepts a directory only if its manifest parses, names the directory's step, and every listed
file exists with the listed size and SHA-256: a crash at any point leaves either the previous checkpoints
or the new one, never a half-written checkpoint that looks complete.

One writer per root is assumed (the platform claims a job with a lease before training it); stale
temporary directories of a crashed writer are removed at the next commit.

``torch.load`` is always called with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from workers.engine.spec import Spec

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_SCRATCH_PREFIXES = (".tmp-step-", ".trash-step-")


class OptimizerState(Protocol):
    """What a checkpoint needs of an optimizer: a ``torch.optim.Optimizer`` or an ``OptimizerSet``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (missing/invalid manifest, missing or altered file)."""


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` restored besides the objects it was given."""

    path: Path
    step: int
    loop_state: dict[str, Any]
    data_state: dict[str, Any]
    spec: dict[str, Any]


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Every global generator's state, as types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``. CUDA states are restored only when the device count matches
    (a job resumed on a machine with other GPUs continues, with fresh CUDA generators)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------------------
# Verification and discovery
# --------------------------------------------------------------------------------------------------------


def verify_checkpoint(path: str | os.PathLike[str], *, check_hashes: bool = True) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint; raises ``CheckpointError`` otherwise.

    ``check_hashes=False`` checks presence and sizes only (cheap; used when pruning).
    """
    root = Path(path)
    match = _STEP_DIR.match(root.name)
    if not match:
        raise CheckpointError(f"{root.name} is not a checkpoint directory name")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{root}: no manifest (an incomplete checkpoint)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{root}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{root}: manifest of an unknown format")
    if manifest.get("step") != int(match.group(1)):
        raise CheckpointError(f"{root}: manifest names step {manifest.get('step')}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{root}: manifest lists no files")
    for name, info in files.items():
        file = root / name
        if not file.is_file():
            raise CheckpointError(f"{root}: {name} is missing")
        if file.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{root}: {name} has {file.stat().st_size} bytes, manifest says {info['bytes']}")
        if check_hashes and _sha256(file) != info["sha256"]:
            raise CheckpointError(f"{root}: {name} does not match its SHA-256")
    return manifest


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def list_checkpoints(root: str | os.PathLike[str], *, check_hashes: bool = False) -> list[Path]:
    """Valid checkpoints under ``root``, oldest first (invalid directories are skipped, not deleted)."""
    valid = []
    for _, path in _step_dirs(Path(root)):
        try:
            verify_checkpoint(path, check_hashes=check_hashes)
        except CheckpointError:
            continue
        valid.append(path)
    return valid


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint that verifies completely (hashes included), or None.

    A newer directory that fails verification (a crash mid-write, a corrupted file) is passed over in
    favour of the previous one: that is why at least two are kept.
    """
    for _, path in reversed(_step_dirs(Path(root))):
        try:
            verify_checkpoint(path, check_hashes=True)
        except CheckpointError:
            continue
        return path
    return None


def checkpoint_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The spec a checkpoint was saved with (as a JSON dict), without loading anything else."""
    spec: dict[str, Any] = json.loads((Path(path) / "spec.json").read_text())
    return spec


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    match = _STEP_DIR.match(Path(path).name)
    if not match:
        raise CheckpointError(f"{path} is not a checkpoint directory name")
    return int(match.group(1))


# --------------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    optimizer: OptimizerState | None,
    spec: Spec,
    loop_state: dict[str, Any],
    data_state: dict[str, Any],
    scaler: torch.amp.GradScaler | None = None,
    keep: int = 2,
    rng_state: dict[str, Any] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Commit the checkpoint of ``step`` under ``root`` and prune to the newest ``keep``; returns its path.

    ``loop_state``/``data_state`` must be JSON-serialisable (floats round-trip exactly through JSON).
    Re-saving an existing step (after a rollback or a resume) replaces it: the old directory is moved
    aside, the new one renamed in, then the old one deleted, so a crash in between leaves at worst one
    checkpoint fewer, never a mixed one.

    Several processes (``workers.engine.distributed``): ``optimizer`` None and ``write_extra(scratch folder)`` writes
    their sharded state into the checkpoint before its manifest lists it; ``rng_state`` replaces this process's
    generators (``{..., "ranks": [every rank's]}``).
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    name = checkpoint_dir_name(step)
    tmp = base / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    trash: Path | None = None
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"step": str(step)})
        if optimizer is not None:
            torch.save(
                {"optimizer": optimizer.state_dict(), "scaler": None if scaler is None else scaler.state_dict()},
                tmp / "optimizer.pt",
            )
        if write_extra is not None:
            write_extra(tmp)
        torch.save(capture_rng_state() if rng_state is None else rng_state, tmp / "rng.pt")
        state = {"step": step, "loop": loop_state, "data": data_state}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        (tmp / "spec.json").write_text(spec.model_dump_json(indent=2))

        files: dict[str, dict[str, Any]] = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(file)
            files[file.relative_to(tmp).as_posix()] = {"sha256": _sha256(file), "bytes": file.stat().st_size}
        manifest = {"format": MANIFEST_FORMAT, "step": step, "created": time.time(), "files": files}
        partial = tmp / f"{MANIFEST}.partial"
        with open(partial, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(partial, tmp / MANIFEST)  # the checkpoint's commit point inside its directory
        _fsync_dir(tmp)

        final = base / name
        if final.exists():
            trash = base / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
        os.rename(tmp, final)
        _fsync_dir(base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    prune_checkpoints(base, keep)
    return final


def prune_checkpoints(root: str | os.PathLike[str], keep: int) -> list[Path]:
    """Keep the newest ``keep`` valid checkpoints; delete every other ``step-*`` directory and scratch
    directories of crashed writers. Returns what was deleted. Called only after a commit, so the newest
    checkpoint is always among those kept."""
    base = Path(root)
    kept = set(list_checkpoints(base)[-keep:])
    deleted = []
    for _, path in _step_dirs(base):
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    for entry in base.iterdir():
        if entry.is_dir() and entry.name.startswith(_SCRATCH_PREFIXES):
            shutil.rmtree(entry, ignore_errors=True)
            deleted.append(entry)
    return deleted


# --------------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: OptimizerState | None = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = True,
    verify: bool = True,
    rank: int = 0,
) -> LoadedCheckpoint:
    """Restore ``model`` (strictly: every key must match), ``optimizer``, ``scaler`` and the RNGs from a
    checkpoint; returns the loop state, data cursor and spec for the caller to apply.

    The model must already be on its device; tensors are loaded onto that device. ``rank``: the process of a
    distributed run whose generators to restore (a checkpoint of fewer processes gives rank 0's to the others).
    """
    root = Path(path)
    if verify:
        verify_checkpoint(root, check_hashes=True)
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(root / "model.safetensors"), strict=True, device=str(device))
    if missing or unexpected:  # strict=True raises first; kept as a guard against a future default
        raise CheckpointError(f"{root}: model keys differ (missing {missing}, unexpected {unexpected})")
    if optimizer is not None or scaler is not None:
        states = torch.load(root / "optimizer.pt", map_location=device, weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(states["optimizer"])
        if scaler is not None and states["scaler"] is not None:
            scaler.load_state_dict(states["scaler"])
    if restore_rng:
        rng = torch.load(root / "rng.pt", map_location="cpu", weights_only=True)
        ranks = rng.get("ranks") or []
        restore_rng_state(ranks[rank] if rank < len(ranks) else rng)
    state = json.loads((root / "state.json").read_text())
    return LoadedCheckpoint(
        path=root,
        step=int(state["step"]),
        loop_state=state["loop"],
        data_state=state["data"],
        spec=json.loads((root / "spec.json").read_text()),
    )
