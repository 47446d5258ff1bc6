"""bf16 autocast against fp32 training on this CPU (issue 18): ``python -m bench.precision [--quick]``.

Prints ONE JSON document to stdout with three sections, every comparison interleaved (A, B, A, B ... in rounds, so
load from other processes hits the variants alike) and reported as medians:

- ``matmul``: the square matmul rate (GFLOP/s) in fp32 and bf16 and their ratio: what the ``cpu`` hardware
  profile's bf16 peak rests on (``workers.engine.hardware.BF16_SPEEDUP_AMX``).
- ``step``: training steps (forward, backward, fused AdamW) of this engine at ``bench.engine``'s FULL shape (8
  experts; QUICK with ``--quick``) in fp32, in bf16 autocast, and in bf16 without the expert-row padding
  (``workers.engine.model.CPU_LOW_PRECISION_GROUP_ROWS`` = 1, what ran before it): tokens/s and phases.
- ``tiny_demo``: the tiny demo template (``tiny-cpu-demo`` on the built-in python-docs corpus) trained with
  ``workers.engine.train.train`` for its own 700 steps (12 with ``--quick``, on 20 help topics) in fp32 and in
  bf16, interleaved in chunks (``train`` resumes from its checkpoint), with the same seed, data and schedule:
  tokens/s, and the validation loss at every evaluation; the issue's target is bf16's final validation loss
  within 2% of fp32's.

The CPU's native bf16 units (``workers.engine.hardware.cpu_bf16_units``) are reported beside the figures; on a
CPU without them bf16 is emulated and the figures say how much slower it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pydoc_data.topics
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.engine import (
    FULL,
    QUICK,
    Shape,
    add_thp_option,
    ask_for_huge_pages,
    cpu_device_label,
    fused_adamw,
    measure_matmul_peak,
    our_spec,
    training_flops_per_token,
)
from workers.engine import model as model_module
from workers.engine.allocator import keep_freed_memory
from workers.engine.data import prepare
from workers.engine.hardware import cpu_bf16_units
from workers.engine.model import build_model
from workers.engine.sinks import MemorySink
from workers.engine.spec import Spec
from workers.engine.train import train

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PHASES = ("forward", "backward", "optimizer")
# name: (autocast dtype or None, rows each expert's group is padded to under autocast)
STEP_VARIANTS: dict[str, tuple[torch.dtype | None, int]] = {
    "fp32": (None, model_module.CPU_LOW_PRECISION_GROUP_ROWS),
    "bf16": (torch.bfloat16, model_module.CPU_LOW_PRECISION_GROUP_ROWS),
    "bf16_unpadded": (torch.bfloat16, 1),
}


@contextlib.contextmanager
def _group_rows(rows: int) -> Iterator[None]:
    previous = model_module.CPU_LOW_PRECISION_GROUP_ROWS
    model_module.CPU_LOW_PRECISION_GROUP_ROWS = rows
    try:
        yield
    finally:
        model_module.CPU_LOW_PRECISION_GROUP_ROWS = previous


def step_section(shape: Shape, experts: int, rounds: int, warmup: int, peak_size: int) -> dict[str, Any]:
    """Tokens/s of training steps per ``STEP_VARIANTS`` entry and the matmul rates, interleaved in rounds."""
    spec = our_spec(shape, experts)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), generator=torch.Generator().manual_seed(0))
    runners = {}
    for name in STEP_VARIANTS:
        torch.manual_seed(0)  # the same initial weights for every variant
        model = build_model(spec).train()
        runners[name] = (model, fused_adamw(model, 3e-4))
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runners}
    rates: dict[str, list[float]] = {name: [] for name in DTYPES}

    def step(name: str) -> tuple[float, float, float]:
        model, optimizer = runners[name]
        dtype, rows = STEP_VARIANTS[name]
        autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with _group_rows(rows):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model(ids, labels=ids).loss
            assert loss is not None
            forward = time.perf_counter()
            loss.backward()
            backward = time.perf_counter()
            optimizer.step()
            model.update_router_biases()
            end = time.perf_counter()
        return forward - start, backward - forward, end - backward

    names = list(runners)
    load_start = os.getloadavg()[0]
    for r in range(warmup + rounds):
        timed = r >= warmup
        for precision, dtype in DTYPES.items():
            rate = measure_matmul_peak(peak_size, 5, dtype)
            if timed:
                rates[precision].append(rate)
        shift = r % len(names)  # rotate the order: no variant always follows the same neighbour
        for name in names[shift:] + names[:shift]:
            elapsed = step(name)
            if timed:
                times[name].append(elapsed)
        print(f"step round {r + 1}/{warmup + rounds}", file=sys.stderr, flush=True)
    tokens = shape.batch * shape.seq_len
    flops = training_flops_per_token(spec) * tokens
    fp32_rate = statistics.median(rates["fp32"])
    out: dict[str, Any] = {}
    for name, measured in times.items():
        totals = [sum(t) for t in measured]
        step_s = statistics.median(totals)
        out[name] = {
            "tokens_per_s": round(tokens / step_s, 1),
            "step_ms_median": round(step_s * 1000, 1),
            "step_ms_all": [round(t * 1000) for t in totals],
            "phase_ms_median": {
                p: round(statistics.median(t[i] for t in measured) * 1000, 1) for i, p in enumerate(PHASES)
            },
            "mfu_vs_fp32_matmul": round(flops / step_s / (fp32_rate * 1e9), 3),
        }
    fp32_tps = out["fp32"]["tokens_per_s"]
    for entry in out.values():
        entry["speedup_vs_fp32"] = round(entry["tokens_per_s"] / fp32_tps, 3)
    return {
        "shape": shape.__dict__,
        "experts": experts,
        "rounds": rounds,
        "warmup": warmup,
        "load_average_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "matmul": {
            "size": peak_size,
            **{f"{p}_gflops_median": round(statistics.median(v), 1) for p, v in rates.items()},
            "bf16_over_fp32_median": round(
                statistics.median(b / f for b, f in zip(rates["bf16"], rates["fp32"], strict=True)), 2
            ),
        },
        "variants": out,
    }


def _demo_corpus(work: Path, examples: int | None) -> Path:
    """The built-in python-docs corpus, or only its first ``examples`` help topics (``--quick``)."""
    from builder.datasets.demo import build_corpus

    corpus = work / "python-docs.jsonl"
    if examples is None:
        build_corpus(corpus)
    else:
        topics = pydoc_data.topics.topics
        corpus.write_text("".join(json.dumps({"text": topics[n].strip()}) + "\n" for n in sorted(topics)[:examples]))
    return corpus


def tiny_demo_section(work: Path, steps: int | None, chunk: int, corpus_examples: int | None) -> dict[str, Any]:
    """The tiny demo template trained ``steps`` steps (its own 700 when None) in fp32 and in bf16, interleaved in
    chunks of ``chunk`` steps; tokens/s from the median step time, validation loss at every evaluation."""
    from builder.configs.presets import PRESETS

    base = PRESETS["tiny-cpu-demo"].spec
    raw = base.model_dump(mode="json")
    if steps is not None:  # --quick: a short run evaluated at its end
        raw["training"].update(max_steps=steps, eval_interval=steps, checkpoint_interval=steps)
        raw["training"]["schedule"]["warmup_steps"] = min(raw["training"]["schedule"]["warmup_steps"], steps // 2)
    specs: dict[str, Spec] = {}
    for precision in DTYPES:
        raw["training"]["precision"] = precision
        specs[precision] = Spec.model_validate(raw)
    total = specs["fp32"].training.max_steps
    prepared = prepare(specs["fp32"], _demo_corpus(work, corpus_examples), work / "prepared")
    sinks = {name: MemorySink() for name in specs}
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    for stop in range(chunk, total + chunk, chunk):
        for name, spec in specs.items():
            train(spec, prepared, work / name, sinks[name], device="cpu", stop_after_step=min(stop, total))
        print(f"tiny demo: step {min(stop, total)}/{total}", file=sys.stderr, flush=True)
    tokens = specs["fp32"].training.batch_size * specs["fp32"].data.seq_len
    out: dict[str, Any] = {}
    for name, sink in sinks.items():
        seconds = [s for _, s in sink.series("step_time_s")]
        val = sink.series("val_loss")
        out[name] = {
            "steps": total,
            "tokens_per_s": round(tokens / statistics.median(seconds), 1),
            "step_ms_median": round(statistics.median(seconds) * 1000, 1),
            "train_seconds": round(sum(seconds), 1),
            "val_loss": round(val[-1][1], 4),
            "val_loss_curve": [[step, round(v, 4)] for step, v in val],
            "train_loss_last_50_mean": round(statistics.fmean(v for _, v in sink.series("loss")[-50:]), 4),
        }
    fp32, bf16 = out["fp32"], out["bf16"]
    relative = (bf16["val_loss"] - fp32["val_loss"]) / fp32["val_loss"]
    return {
        "template": "tiny-cpu-demo",
        "dataset": "python-docs" if corpus_examples is None else f"python-docs (first {corpus_examples} topics)",
        "chunk_steps": chunk,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "variants": out,
        "bf16_speedup": round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 3),
        "bf16_val_loss_relative_difference": round(relative, 4),
        "target": "bf16 validation loss within 2% of fp32 after the same steps",
        "target_met": abs(relative) <= 0.02,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes and a 12-step demo (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="timed step rounds (default 9, quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-tiny-demo", action="store_true", help="skip the tiny demo's training runs")
    add_thp_option(parser)
    args = parser.parse_args(argv)
    ask_for_huge_pages(args)  # as bench.engine: for every variant alike
    torch.set_num_threads(args.threads)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 9)
    started = time.perf_counter()
    with keep_freed_memory():
        step = step_section(
            QUICK if args.quick else FULL, 8, rounds, 1 if args.quick else 2, 256 if args.quick else 1024
        )
    demo = None
    if not args.no_tiny_demo:
        with tempfile.TemporaryDirectory() as work:
            demo = tiny_demo_section(Path(work), *((12, 6, 20) if args.quick else (None, 100, None)))
    result = {
        "bench": "precision_bf16_vs_fp32_cpu",
        "quick": args.quick,
        "device": cpu_device_label(args.threads),
        "cpu_bf16_units": list(cpu_bf16_units()),
        "torch": torch.__version__,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "seconds": round(time.perf_counter() - started, 1),
        "step": step,
        "tiny_demo": demo,
        "notes": [
            "bf16 = torch.autocast('cpu', bfloat16) around the forward; fp32 master weights, fused AdamW in fp32",
            "bf16_unpadded: expert groups not padded (CPU_LOW_PRECISION_GROUP_ROWS=1): oneDNN then builds a "
            "kernel for almost every expert matmul, as the row counts change every step",
            "this machine is shared (2 cores, several agents): compare only within one run",
        ],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
