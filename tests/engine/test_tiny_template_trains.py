"""The tiny CPU demo template really trains on the built-in corpus with the real training loop, and the estimator
puts its full run at about a minute on this CPU. (How long it really takes is a figure of `make bench`, not a
timed test: a test's wall clock measures whatever else the machine is doing.)"""

from __future__ import annotations

import statistics
from pathlib import Path

from builder.configs.presets import PRESETS
from builder.datasets.demo import build_corpus
from workers.engine.estimate import estimate
from workers.engine.hardware import get_profile
from workers.engine.sinks import MemorySink
from workers.engine.train import train

STEPS = 100


def test_tiny_cpu_demo_learns_and_is_estimated_at_about_a_minute(tmp_path: Path) -> None:
    preset = PRESETS["tiny-cpu-demo"]
    spec = preset.spec
    assert preset.dataset == "python-docs" and spec.data.tokenizer == "bpe"
    corpus = tmp_path / "corpus.jsonl"
    build_corpus(corpus)  # the built-in language-modelling corpus, made from Python's own docs

    raw = spec.model_dump()
    raw["training"]["eval_interval"] = 25  # see validation loss fall within the steps run here
    short = type(spec).model_validate(raw)
    sink = MemorySink()
    result = train(short, corpus, tmp_path / "run", sink, stop_after_step=STEPS, device="cpu")
    assert result.status == "stopped" and result.step == STEPS

    losses = [m["loss"] for _, m in sink.points if "loss" in m]
    val = [m["val_loss"] for _, m in sink.points if "val_loss" in m]
    assert len(val) == 4 and val[-1] < val[0] - 0.3 and val == sorted(val, reverse=True), val  # it learns
    assert statistics.mean(losses[-10:]) < statistics.mean(losses[:10]) - 1.0

    # The estimator, uncalibrated, puts the full run at about a minute.
    predicted = estimate(spec, get_profile("cpu")).time.total_seconds
    assert 20 <= predicted <= 90, predicted
