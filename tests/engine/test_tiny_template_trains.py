"""The tiny CPU demo template really trains on the built-in corpus with the real training loop, at a pace that
finishes its full run in about a minute on this machine's CPU."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from builder.configs.presets import PRESETS
from builder.datasets.demo import build_corpus
from workers.engine.estimate import estimate
from workers.engine.hardware import get_profile
from workers.engine.sinks import MemorySink
from workers.engine.train import train

STEPS = 100


def test_tiny_cpu_demo_trains_in_about_a_minute(tmp_path: Path) -> None:
    preset = PRESETS["tiny-cpu-demo"]
    spec = preset.spec
    assert preset.dataset == "python-docs" and spec.data.tokenizer == "bpe"
    corpus = tmp_path / "corpus.jsonl"
    build_corpus(corpus)  # the built-in language-modelling corpus, made from Python's own docs

    raw = spec.model_dump()
    raw["training"]["eval_interval"] = 25  # see validation loss fall within the steps run here
    short = type(spec).model_validate(raw)
    sink = MemorySink()
    started = time.perf_counter()
    result = train(short, corpus, tmp_path / "run", sink, stop_after_step=STEPS, device="cpu")
    elapsed = time.perf_counter() - started
    assert result.status == "stopped" and result.step == STEPS

    losses = [m["loss"] for _, m in sink.points if "loss" in m]
    val = [m["val_loss"] for _, m in sink.points if "val_loss" in m]
    assert len(val) == 4 and val[-1] < val[0] - 0.3 and val == sorted(val, reverse=True), val  # it learns
    assert statistics.mean(losses[-10:]) < statistics.mean(losses[:10]) - 1.0

    # The pace of the full run: its steps at the measured median step time (the median: other processes on a
    # shared machine slow some steps by seconds), plus what this run spent on everything else (tokenizer,
    # evaluation, checkpoints), which the full run spends at most ~3 times.
    step_times = [m["step_time_s"] for _, m in sink.points if "step_time_s" in m]
    per_step = statistics.median(step_times)
    other = max(0.0, elapsed - sum(step_times))
    full_run = spec.training.max_steps * per_step + 3 * other
    assert full_run <= 100, (
        f"the full run would take {full_run:.0f}s ({per_step * 1000:.0f} ms/step, {other:.0f}s other)"
    )
    # And the estimator, uncalibrated, puts it at about a minute too.
    predicted = estimate(spec, get_profile("cpu")).time.total_seconds
    assert 20 <= predicted <= 90, predicted
