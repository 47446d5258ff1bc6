"""Tests of workers/engine/checkpoint.py: exact round trip, atomic commit, verification, retention."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from workers.engine import checkpoint as ckpt
from workers.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from workers.engine.model import MoETransformer, build_model
from workers.engine.spec import Spec

SPEC = Spec.model_validate(
    {
        "model": {
            "vocab_size": 300,
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "max_seq_len": 32,
            "moe": {"num_routed_experts": 4, "expert_hidden_size": 16, "balancing": "aux_free"},
        },
        "data": {"tokenizer": "bytes", "seq_len": 16},
        "training": {"max_steps": 10, "schedule": {"warmup_steps": 1}},
    }
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py


def trained_pair(steps: int = 3) -> tuple[MoETransformer, torch.optim.Optimizer]:
    """A tiny model and optimizer after a few real steps (so optimizer state and router biases are set)."""
    torch.manual_seed(0)
    model = build_model(SPEC)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for _ in range(steps):
        ids = torch.randint(0, 259, (4, 16))
        loss = model(ids, labels=ids).loss
        assert loss is not None
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_router_biases()
    return model, optimizer


def save(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, keep: int = 2) -> Path:
    return save_checkpoint(
        root,
        step,
        model=model,
        optimizer=opt,
        spec=SPEC,
        loop_state={"step": step, "window": [0.1, 1 / 3]},
        data_state={"epoch": 1, "position": 5},
        keep=keep,
    )


def assert_same_optimizer_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key, state in a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["state"][key][name]), (key, name)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model, opt = trained_pair()
    biases = {k: v.clone() for k, v in model.router_biases().items()}
    assert any(bool(b.abs().sum() > 0) for b in biases.values())  # aux_free moved them (3 steps: ±γ)
    path = save(tmp_path, 2, model, opt)
    random_after_save = (random.random(), np.random.rand(), torch.rand(3))

    fresh_model = build_model(SPEC)  # a different initialisation (the RNG moved on)
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2, fused=True)
    loaded = load_checkpoint(path, model=fresh_model, optimizer=fresh_opt)

    for (name, a), (_, b) in zip(model.state_dict().items(), fresh_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for name, bias in fresh_model.router_biases().items():
        assert torch.equal(bias, biases[name])
    assert fresh_model.embed.weight.data_ptr() == fresh_model.state_dict()["embed.weight"].data_ptr()
    assert_same_optimizer_state(opt.state_dict(), fresh_opt.state_dict())
    # The RNGs continue exactly where they were when the checkpoint was taken.
    assert (random.random(), np.random.rand()) == random_after_save[:2]
    assert torch.equal(torch.rand(3), random_after_save[2])
    assert loaded.step == 2
    assert loaded.loop_state == {"step": 2, "window": [0.1, 1 / 3]}  # floats survive JSON exactly
    assert loaded.data_state == {"epoch": 1, "position": 5}
    assert Spec.model_validate(loaded.spec) == SPEC


def test_manifest_lists_every_file_with_its_hash(tmp_path: Path) -> None:
    model, opt = trained_pair(1)
    path = save(tmp_path, 7, model, opt)
    assert path.name == "step-000007"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7
    listed = set(manifest["files"])
    assert listed == {p.name for p in path.iterdir()} - {"manifest.json"}
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "state.json", "spec.json"} <= listed
    assert verify_checkpoint(path)["files"] == manifest["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left behind


def test_checkpoints_without_valid_manifest_are_never_loaded(tmp_path: Path) -> None:
    model, opt = trained_pair(1)
    good = save(tmp_path, 10, model, opt, keep=10)
    assert latest_checkpoint(tmp_path) == good

    # Damage made after all the saves: a later commit prunes invalid directories.
    no_manifest, corrupt, truncated, wrong_step = (save(tmp_path, s, model, opt, keep=10) for s in (20, 30, 40, 50))
    (no_manifest / "manifest.json").unlink()  # a crash before the commit point
    with open(corrupt / "model.safetensors", "r+b") as f:  # same size, one flipped byte
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(truncated / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    manifest = json.loads((wrong_step / "manifest.json").read_text())
    (wrong_step / "manifest.json").write_text(json.dumps({**manifest, "step": 49}))
    (tmp_path / "step-000060").mkdir()  # an empty directory
    (tmp_path / ".tmp-step-000070-abcd").mkdir()  # a writer's scratch directory

    assert latest_checkpoint(tmp_path) == good
    for bad, message in [
        (no_manifest, "no manifest"),
        (corrupt, "SHA-256"),
        (truncated, "bytes"),
        (wrong_step, "names step 49"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            verify_checkpoint(bad)
        with pytest.raises(CheckpointError):
            load_checkpoint(bad, model=build_model(SPEC))
    assert list_checkpoints(tmp_path) == [good, corrupt]  # the cheap check does not hash

    save(tmp_path, 80, model, opt, keep=2)  # the next commit prunes incomplete directories and scratch
    names = {p.name for p in tmp_path.iterdir()}
    assert "step-000080" in names and len(names) == 2
    assert not names & {"step-000020", "step-000040", "step-000050", "step-000060", ".tmp-step-000070-abcd"}


def test_keeps_the_latest_k_and_deletes_only_after_commit(tmp_path: Path) -> None:
    model, opt = trained_pair(1)
    for step in (1, 2, 3):
        save(tmp_path, step, model, opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    (tmp_path / ".tmp-step-000009-dead").mkdir()  # left by a crashed writer
    save(tmp_path, 4, model, opt, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003", "step-000004"]


def test_a_crash_during_commit_keeps_the_previous_checkpoints(tmp_path: Path, monkeypatch: Any) -> None:
    model, opt = trained_pair(1)
    save(tmp_path, 1, model, opt)
    save(tmp_path, 2, model, opt)
    real_rename = os.rename

    def failing_rename(src: Any, dst: Any) -> None:
        if Path(dst).name == "step-000003":
            raise OSError("disk full")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 3, model, opt)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]  # nothing pruned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]  # scratch removed
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    model, opt = trained_pair(1)
    save(tmp_path, 5, model, opt)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    path = save(tmp_path, 5, model, opt)
    fresh = build_model(SPEC)
    load_checkpoint(path, model=fresh, restore_rng=False)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000005"]
