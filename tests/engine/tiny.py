"""The tiny MoE and the letter-cycle corpus the engine tests train on, in one place.

``TINY`` is a real model that trains 20 steps in a second or two on one CPU thread: hidden 32, 2 layers, 4 routed
experts (top-2, aux-free balancing), seq 32, the bytes tokenizer. A test module that needs another shape or run
states it as overrides of ``TINY`` (``tiny_spec(model={"moe": {"num_shared_experts": 1}})``), so the difference
reads in one line.

``write_letters_corpus`` writes the patterned byte corpus: each document is 60 consecutive letters of the cycle
a..p from a seeded random start, so once a model has learnt "next letter" only the first letter of a document is
uncertain; the tests' loss thresholds rest on that. ``tests/engine/conftest.py`` offers it as the ``corpus`` and
``prepared`` fixtures.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tests.engine.specs import merged_spec
from workers.engine.data import PreparedData
from workers.engine.sinks import MemorySink
from workers.engine.spec import Spec
from workers.engine.train import train

LETTERS = "abcdefghijklmnop"

TINY: dict[str, Any] = {
    "model": {
        "vocab_size": 259,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "max_seq_len": 32,
        "moe": {"num_routed_experts": 4, "top_k": 2, "expert_hidden_size": 32, "balancing": "aux_free"},
    },
    "data": {"tokenizer": "bytes", "seq_len": 32, "val_fraction": 0.1},
    "training": {
        "max_steps": 20,
        "batch_size": 8,
        "log_interval": 1,
        "eval_interval": 10,
        "eval_batches": 2,
        "checkpoint_interval": 10,
        "optimizer": {"lr": 1e-2},
        "schedule": {"warmup_steps": 2},
        "seed": 11,
    },
}


def tiny_spec(**sections: dict[str, Any]) -> Spec:
    """``TINY`` with nested overrides, e.g. ``tiny_spec(training={"plateau": {"patience": 2}})``."""
    return merged_spec(TINY, **sections)


def write_letters_corpus(path: Path, documents: int = 200, labelled: bool = False) -> Path:
    """Write ``documents`` JSONL records ``{"text": ...}`` of the letter cycle to ``path`` and return it.

    Seeded: the same count gives the same file, and a longer file starts with the shorter one's documents. With
    ``labelled`` each record also has ``"label"``: ``"early"`` for a document starting in a..h, ``"late"`` in i..p.
    """
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(documents):
            start = rng.randrange(len(LETTERS))
            record: dict[str, Any] = {"text": "".join(LETTERS[(start + j) % len(LETTERS)] for j in range(60))}
            if labelled:
                record["label"] = "early" if start < 8 else "late"
            f.write(json.dumps(record) + "\n")
    return path


def losses(sink: MemorySink) -> dict[int, float]:
    """Per-step training loss, a replayed step keeping its latest value."""
    return dict(sink.series("loss"))


def train_whole_and_resumed(
    spec: Spec, prepared: PreparedData, root: Path, stop_after_step: int = 7
) -> tuple[MemorySink, dict[str, torch.Tensor]]:
    """Train ``spec`` to the end uninterrupted (in ``root/whole``), and again stopped after ``stop_after_step`` steps
    then resumed from its checkpoint (in ``root/split``); assert that the resumed run took the same steps as the
    uninterrupted one, bit for bit: the same loss at every step and the same final weights.

    Returns the uninterrupted run's sink and its final weights, for the caller's own checks (that it learnt)."""
    whole = MemorySink()
    assert train(spec, prepared, root / "whole", whole).status == "completed"
    split_first = MemorySink()
    assert train(spec, prepared, root / "split", split_first, stop_after_step=stop_after_step).step == stop_after_step
    split_second = MemorySink()
    assert train(spec, prepared, root / "split", split_second).status == "completed"
    assert split_second.events_of("resume")[0]["step"] == stop_after_step
    assert {**losses(split_first), **losses(split_second)} == losses(whole)
    final = f"step-{spec.training.max_steps:06d}"
    weights_a, weights_b = (
        load_file(root / run / "checkpoints" / final / "model.safetensors") for run in ("whole", "split")
    )
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    return whole, weights_a
