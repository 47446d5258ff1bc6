"""Tests of the training loop (workers/engine/train.py) and its CLI (python -m workers.engine train).

Every run is a tiny real model on CPU (hidden 32, 2 layers, 4 routed experts, seq 32) on a patterned byte
corpus: each document is 60 consecutive letters of the cycle a..p from a random start, so once a model
has learnt "next letter" only the first letter of a document is uncertain. Both are tests/engine/tiny.py's;
the ``corpus`` and ``prepared`` fixtures are tests/engine/conftest.py's.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.engine.tiny import TINY, losses, train_whole_and_resumed
from tests.engine.tiny import tiny_spec as make_spec
from workers.engine.checkpoint import latest_checkpoint, verify_checkpoint
from workers.engine.data import PreparedData
from workers.engine.sinks import MemorySink, latest_points, read_jsonl
from workers.engine.spec import Spec
from workers.engine.train import EngineConfigError, FaultInjection, TrainResult, lr_at, scheduled_lr, train

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py


def cli(*args: str, **popen: Any) -> subprocess.Popen[str]:
    # Same thread count as this process: float reductions split across threads differently otherwise,
    # and the resume test compares bitwise.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "workers.engine", "train", "--no-progress", *args]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def finish(process: subprocess.Popen[str], timeout: float = 180) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for_step(metrics: Path, step: int, process: subprocess.Popen[str], timeout: float = 120) -> int:
    """Poll the run's JSONL until a metrics line for ``step`` or later appears; return that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended early: {process.communicate()}")
        if metrics.exists():
            steps = [r["step"] for r in read_jsonl(metrics) if r["type"] == "metrics"]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.05)
    pytest.fail(f"step {step} never appeared in {metrics}")


def write_spec(path: Path, spec: Spec) -> Path:
    path.write_text(spec.model_dump_json())
    return path


# --------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------


def test_lr_schedule_is_a_pure_function_of_the_step() -> None:
    spec = make_spec(training={"max_steps": 110, "schedule": {"warmup_steps": 10, "min_lr_ratio": 0.1}})
    peak = 1e-2
    assert lr_at(1, spec) == pytest.approx(peak / 10)
    assert lr_at(5, spec) == pytest.approx(peak / 2)
    assert lr_at(10, spec) == pytest.approx(peak)
    assert lr_at(60, spec) == pytest.approx(0.1 * peak + 0.5 * 0.9 * peak)  # cosine half-way
    assert lr_at(110, spec) == pytest.approx(0.1 * peak)
    assert lr_at(500, spec) == pytest.approx(0.1 * peak)  # past the end: the floor
    linear = make_spec(training={"max_steps": 110, "schedule": {"kind": "linear", "warmup_steps": 10}})
    assert lr_at(60, linear) == pytest.approx(peak - 0.5 * 0.9 * peak)
    constant = make_spec(training={"max_steps": 110, "schedule": {"kind": "constant", "warmup_steps": 0}})
    assert lr_at(1, constant) == lr_at(110, constant) == peak
    values = [lr_at(s, spec) for s in range(11, 111)]
    assert values == sorted(values, reverse=True)  # monotone decay after warmup
    # Warmup-stable-decay: the peak until the last 20% of the run (from step 88), then linear to the floor.
    wsd = make_spec(training={"max_steps": 110, "schedule": {"kind": "wsd", "warmup_steps": 10, "decay_fraction": 0.2}})
    assert lr_at(5, wsd) == pytest.approx(peak / 2)
    assert lr_at(10, wsd) == lr_at(50, wsd) == lr_at(88, wsd) == peak
    assert lr_at(99, wsd) == pytest.approx(0.1 * peak + 0.5 * 0.9 * peak)
    assert lr_at(110, wsd) == lr_at(200, wsd) == pytest.approx(0.1 * peak)
    # Every parameter group follows the schedule from its own peak (Muon's AdamW part from adamw_lr).
    assert scheduled_lr(99, 3e-4, wsd) == pytest.approx(lr_at(99, wsd) * 3e-4 / peak)


def test_refuses_configurations_that_cannot_run(corpus: Path, prepared: PreparedData, tmp_path: Path) -> None:
    other_seed = make_spec(training={"seed": 12})  # another seed makes another train/val split
    with pytest.raises(EngineConfigError, match=r"prepared with other settings \(seed\)"):
        train(other_seed, prepared, tmp_path / "c", MemorySink())
    with pytest.raises(EngineConfigError, match="fp16 needs a CUDA device"):
        train(make_spec(training={"precision": "fp16"}), corpus, tmp_path / "a", MemorySink(), device="cpu")
    spec = make_spec(training={"max_steps": 2})
    train(spec, corpus, tmp_path / "b", MemorySink())
    with pytest.raises(EngineConfigError, match="already holds checkpoints"):
        train(spec, corpus, tmp_path / "b", MemorySink(), resume=False)
    other = make_spec(training={"max_steps": 2}, model={"hidden_size": 64})
    with pytest.raises(EngineConfigError, match="different 'model' section"):
        train(other, corpus, tmp_path / "b", MemorySink())


# --------------------------------------------------------------------------------------------------------
# Learning and metrics
# --------------------------------------------------------------------------------------------------------


def test_tiny_model_learns_the_pattern_and_reports_every_metric(prepared: PreparedData, tmp_path: Path) -> None:
    spec = make_spec(training={"max_steps": 60, "eval_interval": 20, "checkpoint_interval": 30})
    sink = MemorySink()
    result = train(spec, prepared, tmp_path / "run", sink)

    assert result.status == "completed" and result.step == 60
    val = dict(sink.series("val_loss"))
    assert sorted(val) == [20, 40, 60]
    # Bound: a model that ignores context can do no better than the letter frequencies, about
    # ln(16) = 2.77 nats; one that learnt "next letter" pays only for the first letter of each 61-token
    # document and its end, ~0.1 nats. 0.5 is reachable only by using the context (measured: ~0.2).
    assert val[60] < 0.5
    assert result.best_val_loss == min(val.values())
    assert dict(sink.series("val_ppl"))[60] == pytest.approx(math.exp(val[60]))

    step, metrics = sink.points[0]
    assert step == 1
    expected = {"loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "memory_bytes"}
    expected |= {"dropped_fraction", "tokens_seen", "epoch"}
    expected |= {f"expert_load/L{layer}/E{e}" for layer in (0, 1) for e in range(4)}
    assert set(metrics) == expected
    assert metrics["memory_bytes"] > 10_000_000 and metrics["tokens_per_s"] > 0
    for layer in (0, 1):  # fractions of the routed assignments: each block's row sums to 1 (no dropping)
        assert sum(metrics[f"expert_load/L{layer}/E{e}"] for e in range(4)) == pytest.approx(1.0)
    assert [s for s, _ in sink.series("loss")] == list(range(1, 61))
    assert [e["step"] for e in sink.events_of("checkpoint")] == [0, 30, 60]
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step-000060"
    assert json.loads((tmp_path / "run" / "spec.json").read_text()) == spec.model_dump(mode="json")


class WriteAheadProbe(MemorySink):
    """Notes, at each ``flush``, the last step emitted and the checkpoints then on disk."""

    def __init__(self, checkpoints: Path) -> None:
        super().__init__()
        self.checkpoints = checkpoints
        self.flushes: list[tuple[int, list[str]]] = []

    def flush(self) -> None:
        on_disk = sorted(p.name for p in self.checkpoints.glob("step-*")) if self.checkpoints.exists() else []
        self.flushes.append((max((s for s, _ in self.points), default=0), on_disk))


def test_the_record_is_flushed_before_each_checkpoint_is_committed(prepared: PreparedData, tmp_path: Path) -> None:
    """The write-ahead contract (workers/engine/sinks.py): a run resumed from a checkpoint never emits the steps
    before it again, so the sink must have stored them before the checkpoint appears."""
    spec = make_spec(training={"max_steps": 25, "eval_interval": 10, "checkpoint_interval": 10})
    sink = WriteAheadProbe(tmp_path / "run" / "checkpoints")
    result = train(spec, prepared, tmp_path / "run", sink)
    assert result.status == "completed"
    # One flush per checkpoint (0, 10, 20 and the final 25), each after that step's points and before its folder.
    assert [step for step, _ in sink.flushes] == [0, 10, 20, 25]
    for step, on_disk in sink.flushes:
        assert f"step-{step:06d}" not in on_disk
    assert sink.flushes[-1][1] == ["step-000010", "step-000020"]  # the two newest (keep_checkpoints defaults to 2)
    committed = [e["step"] for e in sink.events_of("checkpoint")]
    assert committed == [0, 10, 20, 25]


OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-2},
    "adafactor": {"name": "adafactor", "lr": 0.1},
    "sgd": {"name": "sgd", "lr": 0.3},
    "muon": {"name": "muon", "lr": 0.02, "adamw_lr": 1e-2},
}


def _assert_same_state(a: Any, b: Any, where: str = "") -> None:
    """Nested optimizer state dicts equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_trains_the_tiny_model_down_and_resumes_exactly(
    name: str, prepared: PreparedData, tmp_path: Path
) -> None:
    spec = make_spec(
        training={
            "optimizer": OPTIMIZERS[name],
            "schedule": {"kind": "wsd", "warmup_steps": 2},
            "checkpoint_interval": 5,
        }
    )
    # Stopped at step 7 (between checkpoints) and resumed: the same steps as the uninterrupted run, bit for bit.
    whole, _ = train_whole_and_resumed(spec, prepared, tmp_path, stop_after_step=7)
    loss = losses(whole)
    first, last = [loss[s] for s in (1, 2, 3)], [loss[s] for s in (18, 19, 20)]
    assert sum(last) < 0.5 * sum(first), (first, last)  # measured: 5.6 -> 0.7 (sgd) .. 2.2 (adafactor)
    a, b = tmp_path / "whole" / "checkpoints" / "step-000020", tmp_path / "split" / "checkpoints" / "step-000020"
    state_a = torch.load(a / "optimizer.pt", weights_only=True)["optimizer"]
    _assert_same_state(state_a, torch.load(b / "optimizer.pt", weights_only=True)["optimizer"])
    if name == "muon":
        # Muon's matrices and AdamW's rest each follow the schedule from their own peak.
        assert set(state_a) == {"muon", "muon_experts", "adamw"}
        assert state_a["muon"]["param_groups"][0]["lr"] == scheduled_lr(20, 0.02, spec)
        assert state_a["adamw"]["param_groups"][0]["lr"] == scheduled_lr(20, 1e-2, spec)


def test_multi_token_prediction_streams_its_loss(prepared: PreparedData, tmp_path: Path) -> None:
    spec = make_spec(model={"mtp_depth": 1}, training={"max_steps": 6, "eval_interval": 6})
    sink = MemorySink()
    assert train(spec, prepared, tmp_path / "run", sink).status == "completed"
    mtp = dict(sink.series("mtp_loss"))
    assert sorted(mtp) == list(range(1, 7)) and all(math.isfinite(v) and v > 0 for v in mtp.values())
    assert mtp[6] < mtp[1]  # the modules learn too
    plain = MemorySink()
    train(make_spec(training={"max_steps": 2}), prepared, tmp_path / "plain", plain)
    assert not plain.series("mtp_loss")  # no metric without MTP


def test_classification_reports_accuracy(tmp_path: Path) -> None:
    rng = random.Random(1)
    path = tmp_path / "reviews.csv"
    with open(path, "w") as f:
        f.write("text,label\n")
        for i in range(120):
            words = ["good", "great", "fine"] if i % 2 else ["bad", "awful", "poor"]
            f.write(" ".join(rng.choice(words) for _ in range(rng.randrange(2, 6))) + f",{['neg', 'pos'][i % 2]}\n")
    spec = make_spec(
        model={"task": "classification", "num_labels": 2, "moe": {"first_dense_layers": 1}},
        data={"val_fraction": 0.2},
        training={"max_steps": 30},
    )
    sink = MemorySink()
    result = train(spec, path, tmp_path / "run", sink)
    assert result.status == "completed"
    accuracy = dict(sink.series("val_accuracy"))
    assert sorted(accuracy) == [10, 20, 30]
    assert accuracy[30] >= 0.9  # the two classes use disjoint words: trivially separable
    assert not sink.series("val_ppl")
    assert {k for k in sink.points[0][1] if k.startswith("expert_load")} == {f"expert_load/L1/E{e}" for e in range(4)}


def test_bf16_autocast_runs_on_cpu(prepared: PreparedData, tmp_path: Path) -> None:
    sink = MemorySink()
    result = train(make_spec(training={"max_steps": 2, "precision": "bf16"}), prepared, tmp_path / "run", sink)
    assert result.status == "completed"
    assert all(math.isfinite(v) for _, v in sink.series("loss"))


def test_gradient_checkpointing_recomputes_the_same_steps(prepared: PreparedData, tmp_path: Path) -> None:
    plain, recomputed = MemorySink(), MemorySink()
    train(make_spec(training={"max_steps": 4}), prepared, tmp_path / "plain", plain)
    spec = make_spec(training={"max_steps": 4, "gradient_checkpointing": True})
    train(spec, prepared, tmp_path / "recomputed", recomputed)
    # Recomputation replays the same forward; only the backward's summation order may differ.
    assert [v for _, v in recomputed.series("loss")] == pytest.approx([v for _, v in plain.series("loss")], rel=1e-5)
    assert [v for _, v in recomputed.series("grad_norm")] == pytest.approx(
        [v for _, v in plain.series("grad_norm")], rel=1e-4
    )


# --------------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------------

RESUME_SPEC = make_spec(
    model={"dropout": 0.1},
    training={
        "grad_accum_steps": 2,
        "eval_interval": 5,
        # Interventions at steps 10, 15 and 20 (a plateau by construction: nothing beats min_delta 10),
        # so the resumed half must also restore the raised dropout, the tighter clip and the LR scale.
        "plateau": {"patience": 1, "min_delta": 10.0, "dropout_to": 0.3, "clip_to": 0.5},
        "anomaly": {"window": 5},
    },
)


def test_resume_in_a_fresh_process_equals_an_uninterrupted_run(corpus: Path, tmp_path: Path) -> None:
    whole = MemorySink()
    assert train(RESUME_SPEC, corpus, tmp_path / "whole", whole).status == "completed"

    first = MemorySink()
    half = train(RESUME_SPEC, corpus, tmp_path / "split", first, stop_after_step=10)
    assert (half.status, half.step) == ("stopped", 10)
    spec_file = write_spec(tmp_path / "spec.json", RESUME_SPEC)
    code, out, err = finish(
        cli("--spec", str(spec_file), "--data", str(corpus), "--out", str(tmp_path / "split"), "--resume")
    )
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["status"] == "completed"

    records = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["data"]["step"] for r in records if r.get("kind") == "resume"] == [10]
    second = latest_points(records)
    assert sorted(second) == list(range(11, 21))
    for name in ("loss", "grad_norm", "lr", "aux_loss", "expert_load/L1/E2"):
        resumed = {**dict(first.series(name)), **{s: m[name] for s, m in second.items() if name in m}}
        assert resumed == dict(whole.series(name)), name  # exact float equality, step by step
    assert {s: m["val_loss"] for s, m in second.items() if "val_loss" in m} == {
        s: v for s, v in whole.series("val_loss") if s > 10
    }
    interventions = [e["step"] for e in whole.events_of("intervention")]
    assert interventions == [10, 15, 20]

    a, b = tmp_path / "whole" / "checkpoints" / "step-000020", tmp_path / "split" / "checkpoints" / "step-000020"
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    biases = [name for name in weights_a if name.endswith("router.bias")]
    assert len(biases) == 2 and any(bool(weights_a[n].abs().sum() > 0) for n in biases)  # aux_free moved them
    opt_a = torch.load(a / "optimizer.pt", weights_only=True)["optimizer"]
    opt_b = torch.load(b / "optimizer.pt", weights_only=True)["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key, state in opt_a["state"].items():
        for field, value in state.items():
            assert torch.equal(value, opt_b["state"][key][field]), (key, field)
    state_a, state_b = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
    assert state_a == state_b
    assert state_a["loop"]["dropout"] == 0.3 and state_a["loop"]["grad_clip"] == 0.5


def test_a_checkpoint_without_manifest_is_ignored_on_resume(corpus: Path, tmp_path: Path) -> None:
    spec = make_spec()
    out = tmp_path / "run"
    train(spec, corpus, out, MemorySink())
    final = out / "checkpoints" / "step-000020"
    reference = load_file(final / "model.safetensors")
    (final / "manifest.json").unlink()  # as if the process died before committing step 20
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step-000010"

    sink = MemorySink()
    result = train(spec, corpus, out, sink)
    assert sink.events_of("resume") == [{"step": 10, "checkpoint": str(out / "checkpoints" / "step-000010")}]
    assert [s for s, _ in sink.series("loss")] == list(range(11, 21))
    assert (result.status, result.step) == ("completed", 20)
    verify_checkpoint(final)  # rewritten and committed
    replayed = load_file(final / "model.safetensors")
    assert all(torch.equal(reference[k], replayed[k]) for k in reference)  # deterministic replay

    again = MemorySink()  # a task started again after the run completed: nothing left to do
    assert train(spec, corpus, out, again).status == "completed"
    assert again.points == [] and [k for k, _ in again.events] == ["resume"]


# --------------------------------------------------------------------------------------------------------
# Anomalies
# --------------------------------------------------------------------------------------------------------


def test_nan_and_spike_trigger_rollback_and_training_continues(prepared: PreparedData, tmp_path: Path) -> None:
    spec = make_spec(training={"max_steps": 16, "checkpoint_interval": 5, "anomaly": {"window": 4}})
    clean, faulty = MemorySink(), MemorySink()
    train(spec, prepared, tmp_path / "clean", clean)
    faults = FaultInjection(nan_at_steps=frozenset({8}), spike_at_steps=frozenset({13}))
    result = train(spec, prepared, tmp_path / "faulty", faulty, faults=faults)

    assert (result.status, result.step) == ("completed", 16)
    anomalies = faulty.events_of("anomaly")
    assert [(a["step"], a["kind"], a["action"]) for a in anomalies] == [
        (8, "non_finite_loss", "rollback"),
        (13, "loss_spike", "rollback"),
    ]
    assert math.isnan(anomalies[0]["loss"]) and anomalies[1]["loss"] > anomalies[1]["limit"]
    rollbacks = faulty.events_of("rollback")
    assert [(r["step"], r["from_step"], r["rollbacks"]) for r in rollbacks] == [(5, 8, 1), (10, 13, 2)]
    assert rollbacks[0]["skipped_micro_batches"] == [7]  # the 8th micro-batch (numbered from 0)

    steps = [s for s, _ in faulty.series("loss")]
    assert steps == [*range(1, 8), *range(6, 13), *range(11, 17)]  # replayed from each checkpoint
    series = faulty.series("loss")
    first_pass, replay = dict(series[:7]), dict(series[7:9])
    assert replay == {6: first_pass[6], 7: first_pass[7]}  # the replay is exact up to the bad batch
    assert all(math.isfinite(v) for _, v in series)
    # Up to step 7 the faulty run is the clean run; from step 8 on it trains on other batches.
    assert dict(clean.series("loss"))[7] == first_pass[7]
    assert losses(faulty)[8] != losses(clean)[8]
    state = json.loads((tmp_path / "faulty" / "checkpoints" / "step-000016" / "state.json").read_text())
    assert state["loop"]["rollbacks"] == 2 and 7 in state["loop"]["skip_batches"]


@pytest.mark.parametrize(
    ("anomaly", "reason"),
    [({"action": "stop"}, "anomaly.action is stop"), ({"max_rollbacks": 0}, "max_rollbacks (0) reached")],
)
def test_anomaly_stop_fails_the_run(
    prepared: PreparedData, tmp_path: Path, anomaly: dict[str, Any], reason: str
) -> None:
    sink = MemorySink()
    spec = make_spec(training={"anomaly": anomaly})
    result = train(spec, prepared, tmp_path / "run", sink, faults=FaultInjection(nan_at_steps=frozenset({4})))
    assert (result.status, result.step) == ("failed", 3)
    assert "non_finite_loss at step 4" in result.reason and reason in result.reason
    assert sink.events_of("anomaly")[0]["action"] == "stop" and not sink.events_of("rollback")


# --------------------------------------------------------------------------------------------------------
# Plateau interventions and early stopping
# --------------------------------------------------------------------------------------------------------


def test_plateau_intervention_changes_lr_dropout_and_clip(prepared: PreparedData, tmp_path: Path) -> None:
    # A constructed plateau: an LR of 1e-7 cannot move the loss by min_delta 0.01.
    spec = make_spec(
        training={
            "max_steps": 12,
            "eval_interval": 2,
            "optimizer": {"lr": 1e-7},
            "grad_clip": 1.0,
            "plateau": {
                "patience": 2,
                "min_delta": 0.01,
                "lr_factor": 0.5,
                "dropout_to": 0.3,
                "clip_to": 0.25,
                "max_interventions": 1,
            },
            "early_stopping_patience": 4,
        }
    )
    sink = MemorySink()
    result = train(spec, prepared, tmp_path / "run", sink)

    (event,) = sink.events_of("intervention")  # max_interventions 1: exactly one
    assert event["step"] == 6  # evaluations at 2 (reference), 4 and 6 (two without improvement)
    changes = event["changes"]
    assert changes["lr"]["after"] == pytest.approx(changes["lr"]["before"] * 0.5)
    assert changes["lr_scale"] == {"before": 1.0, "after": 0.5}
    assert changes["dropout"] == {"before": 0.0, "after": 0.3}
    assert changes["grad_clip"] == {"before": 1.0, "after": 0.25}
    lrs = dict(sink.series("lr"))
    assert lrs[6] == lr_at(6, spec) and lrs[7] == lr_at(7, spec) * 0.5  # the new LR applies from step 7

    # Early stopping: evaluations 4, 6, 8, 10 without improvement = patience 4, at step 10.
    assert (result.status, result.step) == ("early_stopped", 10)
    assert sink.events_of("early_stop")[0]["step"] == 10
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000010" / "state.json").read_text())
    assert (state["loop"]["lr_scale"], state["loop"]["dropout"], state["loop"]["grad_clip"]) == (0.5, 0.3, 0.25)


def test_a_plateau_that_raises_dropout_does_not_make_the_anomaly_guard_fail_the_run(
    prepared: PreparedData, tmp_path: Path
) -> None:
    """Dropout raised on a model that has learnt its data lifts the training loss at once, far above the window of
    losses before it. The guard used to call every following step a spike, roll back to the checkpoint that
    already had the new dropout, and fail the run after ``max_rollbacks`` (bench.learning at 300 s)."""
    spec = make_spec(
        training={
            "max_steps": 60,
            "eval_interval": 20,
            "checkpoint_interval": 10,
            # min_delta 10: the second evaluation is a plateau. Only dropout changes.
            "plateau": {
                "patience": 1,
                "min_delta": 10.0,
                "reduce_lr": False,
                "tighten_clip": False,
                "dropout_to": 0.5,
                "max_interventions": 1,
            },
            "anomaly": {"window": 5},
        }
    )
    sink = MemorySink()
    result = train(spec, prepared, tmp_path / "run", sink)

    (event,) = sink.events_of("intervention")
    assert event["step"] == 40 and event["changes"] == {"dropout": {"before": 0.0, "after": 0.5}}
    loss = losses(sink)
    before = [loss[step] for step in range(36, 41)]  # the window the guard held at the intervention
    mean, std = sum(before) / 5, float(torch.tensor(before).std(correction=0))
    limit = mean + spec.training.anomaly.threshold * max(std, 0.01 * mean)
    assert loss[41] > limit  # what the old window would have called a spike
    assert (result.status, result.step) == ("completed", 60), result.reason
    assert sink.events_of("anomaly") == [] and sink.events_of("rollback") == []


def test_disabled_interventions_do_nothing(prepared: PreparedData, tmp_path: Path) -> None:
    spec = make_spec(
        training={
            "max_steps": 8,
            "eval_interval": 2,
            "optimizer": {"lr": 1e-7},
            "plateau": {"patience": 1, "min_delta": 0.01, "reduce_lr": False, "raise_dropout": False},
            "grad_clip": 0.5,  # already tighter than clip_to (1.0): tighten_clip has nothing to do
        }
    )
    sink = MemorySink()
    train(spec, prepared, tmp_path / "run", sink)
    assert sink.events_of("intervention") == []
    assert [v for _, v in sink.series("lr")] == [lr_at(s, spec) for s in range(1, 9)]


# --------------------------------------------------------------------------------------------------------
# Stopping: cooperative, SIGTERM, and a hard kill
# --------------------------------------------------------------------------------------------------------


def test_should_stop_stops_within_one_step_and_checkpoints(prepared: PreparedData, tmp_path: Path) -> None:
    sink = MemorySink()
    previous_handler = signal.getsignal(signal.SIGTERM)

    def should_stop() -> bool:
        return any(step >= 3 for step, _ in sink.points)

    result: TrainResult = train(make_spec(), prepared, tmp_path / "run", sink, should_stop=should_stop)
    assert (result.status, result.step) == ("stopped", 3)
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step-000003"
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") == result.checkpoint
    assert max(step for step, _ in sink.points) == 3
    assert signal.getsignal(signal.SIGTERM) == previous_handler  # the handler is put back


def test_sigterm_preempts_then_resume_completes_with_one_point_per_step(corpus: Path, tmp_path: Path) -> None:
    spec_file = write_spec(tmp_path / "spec.json", make_spec(training={"max_steps": 30}))
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    base = ["--spec", str(spec_file), "--data", str(corpus), "--out", str(out)]
    slow = ["--inject-faults", json.dumps({"sleep_per_step_s": 0.1})]

    # 1. SIGTERM mid-run: a checkpoint at the step reached, exit status 75.
    process = cli(*base, *slow)
    wait_for_step(metrics, 3, process)
    process.send_signal(signal.SIGTERM)
    code, out_text, err = finish(process)
    assert code == 75, err
    preempted = json.loads(out_text.strip().splitlines()[-1])
    assert preempted["status"] == "preempted" and 3 <= preempted["step"] < 10
    stopped_at = preempted["step"]
    verify_checkpoint(out / "checkpoints" / f"step-{stopped_at:06d}")

    # 2. Resume, then a hard kill after steps past the step-10 checkpoint were logged (no checkpoint).
    process = cli(*base, *slow, "--resume")
    killed_after = wait_for_step(metrics, 13, process)
    process.kill()
    process.wait()
    assert 13 <= killed_after < 20

    # 3. Resume again: continues from step 10 and completes.
    code, out_text, err = finish(cli(*base, "--resume"))
    assert code == 0, err
    assert json.loads(out_text.strip().splitlines()[-1])["status"] == "completed"

    records = read_jsonl(metrics)
    resumes = [r["data"]["step"] for r in records if r.get("kind") == "resume"]
    assert resumes == [stopped_at, 10]
    logged = [r["step"] for r in records if r["type"] == "metrics" and "loss" in r["metrics"]]
    assert logged.count(11) == 2  # step 11 really was written twice (before the kill and after)
    tensorboard = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    tensorboard.Reload()
    for tag in ("loss", "lr", "grad_norm", "expert_load/L0/E0"):
        assert [e.step for e in tensorboard.Scalars(tag)] == list(range(1, 31)), tag
    assert [e.step for e in tensorboard.Scalars("val_loss")] == [10, 20, 30]


def test_cli_reports_bad_spec_and_bad_data_with_locations(corpus: Path, tmp_path: Path) -> None:
    bad_spec = copy.deepcopy(TINY)
    bad_spec["model"]["moe"]["top_k"] = 9  # more than the 4 experts
    spec_file = tmp_path / "bad_spec.json"
    spec_file.write_text(json.dumps(bad_spec))
    code, _, err = finish(cli("--spec", str(spec_file), "--data", str(corpus), "--out", str(tmp_path / "a")))
    assert code == 2 and "model.moe.top_k" in err

    good_spec = write_spec(tmp_path / "spec.json", make_spec())
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"text": "fine"}\n{"text": "fine"}\n{"txt": "typo"}\n')
    code, _, err = finish(cli("--spec", str(good_spec), "--data", str(bad_data), "--out", str(tmp_path / "b")))
    assert code == 2 and f"{bad_data}:3: missing field 'text'" in err
