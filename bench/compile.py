"""``training.compile`` measured: compile time and training-step time, eager against ``torch.compile``.

``python -m bench.compile [--quick] [--rounds N] [--steps N] [--cases a,b] [--whole]`` prints ONE JSON
document. Cases: every template sized for this CPU (``builder/configs/presets/*.json`` with ``hardware: cpu``,
its own batch and sequence length) and the ``bench.engine`` FULL shape at 8 and 64 experts (``--quick``: the
the QUICK shape at 4 experts, one round: a smoke test). Per case, each variant is built from the
same seed with fused AdamW (``bench.engine.Runner``) and timed a forward + backward + optimizer step:

- ``eager``: the model as it trains with ``training.compile`` off;
- ``compiled``: ``workers.engine.model.compile_for_training`` (what ``training.compile`` runs: every block
  compiled on its own, the embedding and the fused head eager);
- ``whole`` (``--whole``): the whole forward compiled as one graph (``compile_for_training(scope="model")``).

``compile_s`` is the first step's time less the variant's median step (the first call compiles forward and
backward), with an empty Inductor cache (a temporary ``TORCHINDUCTOR_CACHE_DIR``: a worker's first run of a
shape); ``compile_warm_s`` the same for a second model built afterwards, when Inductor's on-disk cache holds the
graphs (a worker's later runs of the same template). The variants are interleaved in rounds (A, B, A, B ...)
of ``--steps`` steps each, so load from other processes hits them alike; medians and minima in ms, the
compiled/eager ratio of the medians, the steps a run needs to pay the compile time back, and the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.engine import FULL, QUICK, Runner, _seeded_build, cpu_device_label, our_spec
from workers.engine.model import MoETransformer, build_model, compile_for_training
from workers.engine.spec import Spec


class _Trainable(nn.Module):
    """The model under ``Runner``'s step contract (``model(ids, labels=ids, return_logits=False).loss``,
    ``update_router_biases()``), with the labels its task needs: the shifted ids for causal_lm, fixed class labels
    for classification."""

    def __init__(self, model: MoETransformer, forward: Callable[..., Any], class_labels: torch.Tensor | None) -> None:
        super().__init__()
        self.model = model
        self._forward = forward
        self.class_labels = class_labels

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, return_logits: bool = True) -> Any:
        labels = labels if self.class_labels is None else self.class_labels
        return self._forward(ids, labels=labels, return_logits=return_logits)

    def update_router_biases(self) -> None:
        self.model.update_router_biases()


def _runner(name: str, spec: Spec, variant: str, class_labels: torch.Tensor | None) -> Runner:
    def make() -> tuple[nn.Module, Any]:
        model, optimizer = _seeded_build(lambda: build_model(spec))
        eager = model
        assert isinstance(eager, MoETransformer)
        forward: Callable[..., Any] = eager
        if variant != "eager":
            forward = compile_for_training(eager, scope="model" if variant == "whole" else "blocks")
        return _Trainable(eager, forward, class_labels), optimizer

    model, optimizer = make()
    return Runner(
        name=variant,
        experts=spec.model.moe.num_routed_experts,
        model=model,
        optimizer=optimizer,
        is_ours=True,
        times=[],
    )


def cases(quick: bool) -> dict[str, Spec]:
    """Case name -> spec: the CPU templates, then the engine bench's shape at 8 and 64 experts."""
    from builder.configs.presets import PRESETS  # plain data + the engine: no Django needed

    cpu = {name: p.spec for name, p in PRESETS.items() if p.hardware == "cpu"}
    if quick:
        return {"bench_quick_4_experts": our_spec(QUICK, 4)}
    return {**cpu, "bench_full_8_experts": our_spec(FULL, 8), "bench_full_64_experts": our_spec(FULL, 64)}


def measure_case(spec: Spec, variants: list[str], rounds: int, steps: int) -> dict[str, Any]:
    """Compile time and interleaved step times of each variant for ``spec`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    batch, seq = spec.training.batch_size, spec.data.seq_len
    ids = torch.randint(0, spec.model.vocab_size, (batch, seq), generator=gen)
    class_labels = None
    if spec.model.task == "classification":
        assert spec.model.num_labels is not None
        class_labels = torch.randint(0, spec.model.num_labels, (batch,), generator=gen)
    runners, first = [], {}
    for variant in variants:
        runner = _runner(variant, spec, variant, class_labels)
        first[variant] = sum(runner.step(ids))  # eager: a warm-up; compiled: the compile and one step
        runner.step(ids)  # a second untimed step: the optimizer's state exists, allocations settled
        runners.append(runner)
    for _ in range(rounds):
        for runner in runners:
            runner.times.extend(runner.step(ids) for _ in range(steps))
    out: dict[str, Any] = {"batch": batch, "seq_len": seq, "experts": spec.model.moe.num_routed_experts}
    for runner in runners:
        per_step = [sum(t) for t in runner.times]
        median = statistics.median(per_step)
        out[runner.name] = {
            "step_ms_median": round(median * 1000, 1),
            "step_ms_min": round(min(per_step) * 1000, 1),
            "first_step_s": round(first[runner.name], 2),
        }
        if runner.name != "eager":
            # Dynamo would reuse this process' compiled code for a second model of the same shapes (the
            # parameters are graph inputs): forgotten here, so the warm compile is a new process' (on-disk cache).
            torch._dynamo.reset()
            again = _runner(runner.name, spec, runner.name, class_labels)
            warm = sum(again.step(ids))
            out[runner.name]["compile_s"] = round(max(0.0, first[runner.name] - median), 2)
            out[runner.name]["compile_warm_s"] = round(max(0.0, warm - median), 2)
    eager = out["eager"]["step_ms_median"]
    for variant in variants[1:]:
        entry = out[variant]
        entry["ratio_to_eager"] = round(entry["step_ms_median"] / eager, 3)
        saved_ms = eager - entry["step_ms_median"]
        # Steps a run must take before the compile is paid back; None: compiled steps are not faster.
        entry["break_even_steps"] = round(entry["compile_s"] * 1000 / saved_ms) if saved_ms > 0 else None
        entry["break_even_steps_warm"] = round(entry["compile_warm_s"] * 1000 / saved_ms) if saved_ms > 0 else None
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny shape only: a smoke test")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per round (default 3, quick 1)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--whole", action="store_true", help="also time the whole forward compiled as one graph")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--keep-cache", action="store_true", help="use Inductor's usual cache (default: an empty one for this run)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    steps = args.steps if args.steps is not None else (1 if args.quick else 3)
    variants = ["eager", "compiled", *(["whole"] if args.whole else [])]
    chosen = cases(args.quick)
    if args.cases:
        chosen = {name: chosen[name] for name in args.cases.split(",")}
    started = time.perf_counter()
    load_before = os.getloadavg()
    results = {}
    with contextlib.ExitStack() as stack:
        if not args.keep_cache:
            # Inductor reads the variable at each compile: every case starts cold (its shapes are new to it).
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = stack.enter_context(tempfile.TemporaryDirectory())
        for name, spec in chosen.items():
            results[name] = measure_case(spec, variants, rounds, steps)
            results[name]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    report = {
        "bench": "engine_compile",
        "quick": args.quick,
        "device": cpu_device_label(args.threads),
        "torch": torch.__version__,
        "rounds": rounds,
        "steps_per_round": steps,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
