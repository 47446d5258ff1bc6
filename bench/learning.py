"""Learning per second: the tiny MoE demo template against a dense model of the same active size (``make bench``).

``python -m bench.learning [--quick] [--seconds N]`` prints ONE JSON document to stdout. Both models train on
the built-in ``python-docs`` corpus for the same training time (``--seconds``, per model: 300 by default, the
issue's "5 minutes here"), interleaved in chunks
so that load from other processes hits both alike (``bench.engine.train_same_wall_time``), and both report
their validation loss against training seconds: a curve of evaluations at equal step intervals, the clock being
the summed step time (evaluations and checkpoints excluded), plus the step time and the final validation loss.
Beside the comparison at the end, ``side_by_side`` puts the two curves at the same seconds at each of the MoE's
evaluations, and each model reports its epochs and final training loss: the built-in corpus is small enough
(~630K training tokens) that a few minutes of training make several passes over it, and which model leads at the
end then depends on which one overfits first, not only on which one learns faster. Both train with the template's
plateau interventions (``training.plateau``: once validation loss stops improving, a lower learning rate, dropout
0.2 and tighter clipping); each model's ``interventions`` lists when they came (step, seconds, what changed), since
they bend its curve.

The two models: ``moe`` is the ``tiny-cpu-demo`` template as it stands; ``dense`` is the same template with every
layer dense (``moe.first_dense_layers = num_layers``), whose feed-forward hidden size defaults to
``(top_k + num_shared_experts) x expert_hidden_size``: the same matmul work per token as the MoE layer's active
experts. Width, depth, heads, vocabulary, batch, learning rate and schedule shape are the template's; each model's
``max_steps`` fills the budget at its own calibrated step time, so each one's cosine schedule ends at the budget.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.engine import _step_seconds, _variant, cpu_device_label, train_same_wall_time, write_demo_corpus
from workers.engine.data import prepare
from workers.engine.estimate import parameter_breakdown
from workers.engine.sinks import MemorySink
from workers.engine.spec import Spec

TEMPLATE = "tiny-cpu-demo"
FINAL_TRAIN_STEPS = 100  # final_train_loss: the mean training loss of a run's last this many steps


def moe_and_dense(base: Spec) -> dict[str, Spec]:
    """The template (``moe``) and its dense twin of the same active size (``dense``; module docstring)."""
    moe = base.model.moe.model_dump()
    dense = _variant(base, {"moe": {**moe, "first_dense_layers": base.model.num_layers}})
    return {"moe": base, "dense": dense}


def _seconds_at(sink: MemorySink) -> dict[int, float]:
    """Each step's summed step time up to and including it."""
    seconds_at: dict[int, float] = {}
    total = 0.0
    for step, seconds in sorted(sink.series("step_time_s")):
        total += seconds
        seconds_at[step] = total
    return seconds_at


def interventions(sink: MemorySink) -> list[dict[str, Any]]:
    """``[{"step", "seconds", "changes"}]``: each plateau intervention, ``changes`` naming what it set (``lr_scale``,
    ``dropout``, ``grad_clip``: the new value)."""
    seconds_at = _seconds_at(sink)
    return [
        {
            "step": event["step"],
            "seconds": round(seconds_at.get(event["step"], 0.0), 2),
            "changes": {name: change["after"] for name, change in event["changes"].items() if name != "lr"},
        }
        for event in sink.events_of("intervention")
    ]


def loss_curve(sink: MemorySink) -> list[dict[str, float]]:
    """``[{"step", "seconds", "val_loss"}]``: each evaluation with the summed step time up to its step."""
    seconds_at = _seconds_at(sink)
    return [
        {"step": step, "seconds": round(seconds_at[step], 2), "val_loss": round(value, 4)}
        for step, value in sink.series("val_loss")
        if step in seconds_at
    ]


def loss_at(curve: list[dict[str, float]], seconds: float) -> float | None:
    """The validation loss at ``seconds`` of training, linearly interpolated between evaluations (None before
    the first one or past the last)."""
    for before, after in itertools.pairwise(curve):
        if before["seconds"] <= seconds <= after["seconds"]:
            span = after["seconds"] - before["seconds"]
            t = 0.0 if span == 0 else (seconds - before["seconds"]) / span
            return round(before["val_loss"] + t * (after["val_loss"] - before["val_loss"]), 4)
    return None


def side_by_side(moe: list[dict[str, float]], dense: list[dict[str, float]]) -> list[dict[str, float]]:
    """At each of the MoE's evaluations that the dense curve spans: ``{"seconds", "moe", "dense"}``, the dense
    model's validation loss interpolated at the same training seconds."""
    rows = []
    for point in moe:
        other = loss_at(dense, point["seconds"])
        if other is not None:
            rows.append({"seconds": point["seconds"], "moe": point["val_loss"], "dense": other})
    return rows


def candidate(
    base: Spec,
    routed_experts: int | None = None,
    batch_size: int | None = None,
    dropout: float | None = None,
    compile_models: bool = False,
    first_dense_layers: int | None = None,
    scoring: str | None = None,
    routed_scaling_factor: float | None = None,
    balancing: str | None = None,
) -> Spec:
    """The template ``base`` with a candidate setting in place of its own, to measure it before it becomes the
    template: ``routed_experts``, ``first_dense_layers`` (the MoE's dense bottom layers), ``scoring``,
    ``routed_scaling_factor`` and ``balancing`` (the router's), ``batch_size``, ``dropout`` (``model.dropout``),
    ``compile_models`` (``training.compile``). ``moe_and_dense`` then derives the dense twin from it, whose active
    size depends on no expert or router setting."""
    moe = base.model.moe.model_dump()
    if routed_experts is not None:
        moe["num_routed_experts"] = routed_experts
    if scoring is not None:
        moe["scoring"] = scoring
    if routed_scaling_factor is not None:
        moe["routed_scaling_factor"] = routed_scaling_factor
    if balancing is not None:
        moe["balancing"] = balancing
    if first_dense_layers is not None:
        moe["first_dense_layers"] = first_dense_layers
    model: dict[str, Any] = {"moe": moe}
    if dropout is not None:
        model["dropout"] = dropout
    training: dict[str, Any] = {}
    if batch_size is not None:
        training["batch_size"] = batch_size
    if compile_models:
        training["compile"] = True
    return _variant(base, model, training)


def learning_per_second(
    work: Path,
    seconds: float,
    calibration_steps: int,
    chunk: int,
    evaluations: int,
    corpus_examples: int | None = None,
    warmup_steps: int | None = None,
    routed_experts: int | None = None,
    batch_size: int | None = None,
    dropout: float | None = None,
    compile_models: bool = False,
    first_dense_layers: int | None = None,
    scoring: str | None = None,
    routed_scaling_factor: float | None = None,
    balancing: str | None = None,
) -> dict[str, Any]:
    """Train the template and its dense twin for ``seconds`` of step time each; their curves and figures.

    ``warmup_steps`` replaces the template's (``--quick``: a budget of a few seconds is shorter than it);
    ``routed_experts``, ``batch_size``, ``dropout``, ``compile_models``, ``first_dense_layers``, ``scoring``,
    ``routed_scaling_factor`` and ``balancing`` are passed to ``candidate``. With ``compile_models`` the first step
    of every chunk compiles (from Inductor's cache after the first chunk) and is left out of the clock like every
    compile.
    """
    from builder.configs.presets import PRESETS

    base = candidate(
        PRESETS[TEMPLATE].spec,
        routed_experts,
        batch_size,
        dropout,
        compile_models,
        first_dense_layers,
        scoring,
        routed_scaling_factor,
        balancing,
    )
    schedule = base.training.schedule.model_dump()
    if warmup_steps is not None:
        schedule["warmup_steps"] = warmup_steps
    # One checkpoint per chunk (train resumes from it); evaluations as train_same_wall_time sets them.
    base = _variant(base, training={"checkpoint_interval": 10_000_000, "log_interval": 1, "schedule": schedule})
    corpus = write_demo_corpus(work / "python-docs.jsonl", corpus_examples)
    prepared = prepare(base, corpus, work / "prepared")
    # Every evaluation covers the whole validation split (``eval_batches`` is an upper bound; one window per
    # seq_len tokens bounds the batches): the template's 4 batches (4,096 tokens) moved the loss by up to
    # 0.04 between neighbouring evaluations, more than the two models' difference.
    val_tokens = prepared.meta["splits"]["val"]["tokens"]
    base = _variant(base, training={"eval_batches": max(1, min(10_000, -(-val_tokens // base.data.seq_len)))})
    specs = moe_and_dense(base)
    started = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)
    run = train_same_wall_time(specs, prepared, work, lambda _: seconds, calibration_steps, chunk, evaluations)
    models: dict[str, Any] = {}
    for name, spec in run.specs.items():
        sink = run.sinks[name]
        step_s = _step_seconds(sink)
        curve = loss_curve(sink)
        breakdown = parameter_breakdown(spec)
        train_loss = [value for _, value in sink.series("loss")][-FINAL_TRAIN_STEPS:]
        models[name] = {
            "steps": spec.training.max_steps,
            "epochs": round(sink.series("epoch")[-1][1], 2),
            "calibrated_step_ms": round(run.calibrated[name] * 1000, 1),
            "step_ms_median": round(statistics.median(step_s) * 1000, 1),
            "train_seconds": round(sum(step_s), 1),
            "final_val_loss": curve[-1]["val_loss"] if curve else None,
            "final_train_loss": round(statistics.fmean(train_loss), 4) if train_loss else None,
            "best_val_loss": min((point["val_loss"] for point in curve), default=None),
            "parameters": breakdown["total"],
            "active_matmul_parameters": breakdown["active_matmul"],
            "interventions": interventions(sink),
            "anomalies": len(sink.events_of("anomaly")),
            "curve": curve,
        }
    moe, dense = models["moe"], models["dense"]
    # Compared where both curves have a point: at the shorter run's end (the budget, up to calibration noise).
    common = min(moe["curve"][-1]["seconds"], dense["curve"][-1]["seconds"]) if moe["curve"] and dense["curve"] else 0
    at_common = {name: loss_at(entry["curve"], common) for name, entry in models.items()}
    paired = side_by_side(moe["curve"], dense["curve"])
    m = base.model
    return {
        "template": TEMPLATE,
        "dataset": "python-docs" if corpus_examples is None else f"python-docs (first {corpus_examples} topics)",
        "train_tokens": prepared.meta["splits"]["train"]["tokens"],
        "val_tokens": val_tokens,
        "shape": {
            "layers": m.num_layers,
            "hidden_size": m.hidden_size,
            "heads": m.num_heads,
            "vocab": m.vocab_size,
            "routed_experts": m.moe.num_routed_experts,
            "first_dense_layers": m.moe.first_dense_layers,
            "scoring": m.moe.scoring,
            "routed_scaling_factor": m.moe.routed_scaling_factor,
            "balancing": m.moe.balancing,
            "shared_experts": m.moe.num_shared_experts,
            "top_k": m.moe.top_k,
            "expert_hidden_size": m.moe.expert_hidden_size,
            "dense_hidden_size": m.moe.resolved_dense_hidden_size,
            "batch": base.training.batch_size,
            "seq_len": base.data.seq_len,
            "dropout": m.dropout,
            "compile": base.training.compile,
        },
        "budget_seconds": round(run.budget_s, 1),
        "calibration_steps": run.calibration_steps,
        "chunk_steps": chunk,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "models": models,
        "compared_at_seconds": round(common, 2),
        "val_loss_at_compared_seconds": at_common,
        "moe_step_over_dense": round(moe["step_ms_median"] / dense["step_ms_median"], 3),
        "side_by_side": paired,
        "moe_ahead_at_evaluations": sum(row["moe"] < row["dense"] for row in paired),
        "evaluations_compared": len(paired),
        "moe_wins_per_second": (
            at_common["moe"] is not None and at_common["dense"] is not None and at_common["moe"] < at_common["dense"]
        ),
    }


NOTES = [
    "moe: the tiny-cpu-demo template; dense: the same with every layer dense, feed-forward hidden "
    "(top_k + shared) x expert_hidden_size (the same active matmul work per token); same data, batch, lr, schedule",
    "each model's max_steps fills budget_seconds at its calibrated step time; the two train interleaved in chunks; "
    "curve: val_loss (the whole validation split, val_tokens) at equal step intervals against summed step seconds "
    "(evaluations and checkpoints excluded)",
    "val_loss_at_compared_seconds: each curve interpolated at the shorter run's last evaluation",
    "side_by_side: at each MoE evaluation, the dense curve interpolated at the same seconds; "
    "moe_ahead_at_evaluations counts the rows of side_by_side (evaluations_compared in all) where the MoE's "
    "validation loss is the lower",
    "epochs: passes over the corpus's train_tokens (the trainer's epoch metric at the last step); "
    f"final_train_loss: the mean training loss of the last {FINAL_TRAIN_STEPS} steps (against final_val_loss: "
    "the generalisation gap); best_val_loss: the lowest point of the curve",
    "interventions: the plateau interventions of the template (training.plateau) in each run, at the step and "
    "training seconds they came, with what they set; anomalies: steps the anomaly guard refused (rolled back)",
    "this machine is shared with other work (2 cores, several agents): step times vary run to run; see "
    "load_average_1min",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke test (seconds, part of the corpus)")
    parser.add_argument("--seconds", type=float, default=None, help="training seconds per model (default 300)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--routed-experts", type=int, default=None, help="instead of the template's")
    parser.add_argument("--batch-size", type=int, default=None, help="instead of the template's")
    parser.add_argument("--dropout", type=float, default=None, help="model.dropout instead of the template's")
    parser.add_argument(
        "--first-dense-layers",
        type=int,
        default=None,
        help="the MoE's moe.first_dense_layers instead of the template's",
    )
    parser.add_argument("--scoring", choices=["softmax", "sigmoid"], default=None, help="instead of the template's")
    parser.add_argument(
        "--routed-scaling-factor", type=float, default=None, help="model.moe.routed_scaling_factor instead"
    )
    parser.add_argument(
        "--balancing", choices=["aux_loss", "aux_free", "none"], default=None, help="instead of the template's"
    )
    parser.add_argument("--compile", action="store_true", help="train both models with training.compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seconds = args.seconds if args.seconds is not None else (5.0 if args.quick else 300.0)
    with tempfile.TemporaryDirectory() as work:
        result = learning_per_second(
            Path(work),
            seconds,
            calibration_steps=3 if args.quick else 30,
            chunk=10 if args.quick else 50,
            evaluations=3 if args.quick else 12,
            corpus_examples=20 if args.quick else None,
            warmup_steps=3 if args.quick else None,
            routed_experts=args.routed_experts,
            batch_size=args.batch_size,
            dropout=args.dropout,
            compile_models=args.compile,
            first_dense_layers=args.first_dense_layers,
            scoring=args.scoring,
            routed_scaling_factor=args.routed_scaling_factor,
            balancing=args.balancing,
        )
    report = {
        "bench": "learning_per_second",
        "quick": args.quick,
        "device": cpu_device_label(args.threads),
        "torch": torch.__version__,
        **result,
        "notes": NOTES,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
