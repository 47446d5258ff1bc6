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

from tests.engine.specs import merged_spec
from workers.engine.sinks import MemorySink
from workers.engine.spec import Spec

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
