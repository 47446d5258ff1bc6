"""Training on 2 CPU processes (gloo, torch.distributed.run) takes the steps of 1 process with the same global batch.

One launch of ``tests/engine/distributed_run.py`` trains DDP, FSDP2 and expert-parallel runs, each also split in two
pieces (stop, then resume from the checkpoint), and compares the expert-parallel layer with the unsharded model.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.engine.specs import merged_spec
from tests.engine.tiny import TINY
from workers.engine.checkpoint import latest_checkpoint, load_checkpoint
from workers.engine.data import prepare
from workers.engine.distributed import launch_environment
from workers.engine.model import build_model
from workers.engine.sinks import MemorySink
from workers.engine.spec import Spec
from workers.engine.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py

# The engine tests' tiny model (tests/engine/tiny.py; no token dropping: a capacity computed on each rank's half of
# the batch would drop other tokens), with a run short enough for two processes.
BASE: dict[str, Any] = copy.deepcopy(TINY)
BASE["training"].update(max_steps=6, eval_interval=3, checkpoint_interval=3)
LAYOUTS: dict[str, dict[str, Any]] = {
    "ddp": {"devices": 2},
    "fsdp": {"devices": 2, "strategy": "fsdp"},
    "ep": {"devices": 2, "expert_parallel": True},
}
# fp32 on 2 processes: the gradients are reduced in another order than one process sums them, so the runs agree to
# rounding, which Adam's normalised steps carry forward: 6 steps stay within this.
LOSS_TOLERANCE = 1e-4


def _spec(distributed: dict[str, Any]) -> Spec:
    return merged_spec(BASE, training={"distributed": distributed})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 2-process results (from the launched script) and the 1-process references, by layout."""
    root = tmp_path_factory.mktemp("distributed")
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    corpus = root / "letters.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": "".join(letters[(s + j) % 26] for j in range(60))}) + "\n"
            for s in (rng.randrange(26) for _ in range(200))
        )
    )
    prepared = prepare(_spec({}), corpus, root / "prepared")
    specs = root / "specs.json"
    specs.write_text(json.dumps([[name, _spec(layout).model_dump(mode="json")] for name, layout in LAYOUTS.items()]))
    out = root / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(Path(__file__).with_name("distributed_run.py")),
        str(specs),
        str(root / "prepared"),
        str(out),
    ]
    env = {**launch_environment(2, "cpu"), "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    results["out"] = out
    for name in ("ddp", "ep"):  # one process: the spec's distributed section aside, the same run
        sink = MemorySink()
        train(_spec({}), prepared, root / f"single-{name}", sink, device="cpu")
        results[f"single-{name}"] = {
            "loss": [v for _, v in sink.series("loss")],
            "grad_norm": [v for _, v in sink.series("grad_norm")],
        }
    return results


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(runs: dict[str, Any], layout: str) -> None:
    two, one = runs[layout], runs["single-ddp"]
    assert two["status"] == "completed" and two["step"] == 6
    assert len(two["loss"]) == len(one["loss"]) == 6
    worst = max(abs(a - b) for a, b in zip(two["loss"], one["loss"], strict=True))
    print(f"{layout}: max |Δloss| over 6 steps = {worst:.2e}")
    assert worst < LOSS_TOLERANCE
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)
    # The loss fell: a run that trained nothing would match too.
    assert two["loss"][-1] < two["loss"][0]
    # The published expert load is over the global batch: each layer's fractions sum to 1.
    for row in two["expert_load"]:
        assert sum(row) == pytest.approx(2.0, abs=1e-5)  # 2 MoE layers, each summing to 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_resumed_two_process_run_continues_exactly(runs: dict[str, Any], layout: str) -> None:
    whole, split = runs[layout], runs[f"{layout}-split"]
    assert split["first"]["status"] == "stopped" and split["first"]["step"] == 3
    assert split["second"]["status"] == "completed" and "resume" in split["second"]["events"]
    # Steps 4..6 of the resumed run are the uninterrupted run's, bit for bit.
    assert split["second"]["loss"] == whole["loss"][3:]


def test_the_stop_file_stops_every_rank_at_the_same_step_with_a_checkpoint(runs: dict[str, Any]) -> None:
    preempted = runs["preempted"]
    assert preempted["status"] == "preempted" and preempted["step"] == 0 and preempted["loss"] == []
    assert latest_checkpoint(Path(runs["out"]) / "preempted" / "checkpoints") is not None


def test_expert_parallel_forward_and_gradients_equal_the_unsharded_model(runs: dict[str, Any]) -> None:
    layer = runs["ep-layer"]
    print(f"expert parallel vs unsharded: forward {layer['forward_max_abs']:.2e}, grads {layer['grad_max_rel']:.2e}")
    assert layer["experts_here"] == 4  # w_in and w_out of 2 MoE layers, half the experts each
    assert layer["forward_max_abs"] < 1e-5
    assert layer["grad_max_rel"] < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_distributed_checkpoint_loads_in_one_process(runs: dict[str, Any], layout: str) -> None:
    """Evaluation and export read model.safetensors as always: it holds the whole model, however it was trained."""
    path = latest_checkpoint(Path(runs["out"]) / layout / "checkpoints")
    assert path is not None
    model = build_model(_spec({}))
    loaded = load_checkpoint(path, model=model, restore_rng=False)
    assert loaded.step == 6
    assert model.moe_layers[0].w_in.shape[0] == 4  # every expert
    files = set(os.listdir(path))
    if layout == "fsdp":
        assert "optimizer" in files and "optimizer.pt" not in files  # sharded state, torch.distributed.checkpoint
    elif layout == "ep":
        assert {"optimizer-rank0.pt", "optimizer-rank1.pt"} <= files
    else:
        assert "optimizer.pt" in files
