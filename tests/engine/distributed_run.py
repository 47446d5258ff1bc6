"""Run by ``tests/engine/test_distributed.py`` under ``torch.distributed.run`` (2 CPU processes, gloo).

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/engine/distributed_run.py SPECS PREPARED OUT``
trains each spec of ``SPECS`` (a JSON list of ``[name, raw spec]``) into ``OUT/<name>`` and again into
``OUT/<name>-split`` in two pieces (stop after step 3, then resume), then compares the expert-parallel layer with the
unsharded model on one batch. Rank 0 writes ``OUT/results.json``: per run the logged ``loss``, ``grad_norm`` and
``expert_load`` rows by step, and the forward/gradient differences.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from workers.engine.data import Batches, PreparedData
from workers.engine.distributed import STOP_FILE, DiscardSink, Parallel
from workers.engine.model import build_model
from workers.engine.sinks import MemorySink, MetricsSink
from workers.engine.spec import Spec, load_spec
from workers.engine.train import train


def _series(sink: MemorySink) -> dict[str, Any]:
    loads = {step: [v for k, v in m.items() if k.startswith("expert_load/")] for step, m in sink.points if "loss" in m}
    return {
        "loss": [v for _, v in sink.series("loss")],
        "grad_norm": [v for _, v in sink.series("grad_norm")],
        "expert_load": [loads[s] for s in sorted(loads)],
        "events": [k for k, _ in sink.events],
    }


def _run(spec: Spec, prepared: PreparedData, out: Path, parallel: Parallel, **kwargs: Any) -> dict[str, Any]:
    sink: MetricsSink = MemorySink() if parallel.is_main else DiscardSink()
    result = train(spec, prepared, out, sink, parallel=parallel, device="cpu", **kwargs)
    return {"status": result.status, "step": result.step, **(_series(sink) if isinstance(sink, MemorySink) else {})}


def _expert_parallel_equals_unsharded(spec: Spec, prepared: PreparedData, parallel: Parallel) -> dict[str, float]:
    """Forward rows and every gradient of the expert-parallel model against the whole model on the global batch."""
    torch.manual_seed(0)
    whole = build_model(spec)
    sharded = copy.deepcopy(whole)
    step_model = parallel.wrap(sharded, torch.device("cpu"))
    batch = next(Batches(prepared, "train", spec.training.batch_size, spec.data.seq_len, seed=3))
    mine = parallel.shard(batch)
    out = step_model(mine.input_ids, labels=mine.labels)
    out.loss.backward()
    ref = whole(batch.input_ids, labels=batch.labels)
    ref.loss.backward()
    rows = slice(parallel.rank * mine.input_ids.shape[0], (parallel.rank + 1) * mine.input_ids.shape[0])
    forward = (out.logits - ref.logits[rows]).abs().max()
    experts = parallel.expert_parameters(sharded)
    worst = torch.zeros(())
    reference = dict(whole.named_parameters())
    for name, p in sharded.named_parameters():
        expected = reference[name].grad
        assert p.grad is not None and expected is not None, name
        if id(p) in experts:
            local = p.shape[0]
            expected = expected[parallel.rank * local : (parallel.rank + 1) * local]
        worst = torch.maximum(worst, (p.grad - expected).abs().max() / expected.abs().max().clamp(min=1e-12))
    both = torch.stack([forward, worst])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return {"forward_max_abs": float(both[0]), "grad_max_rel": float(both[1]), "experts_here": len(experts)}


def main() -> None:
    specs_file, prepared_dir, out_dir = (Path(a) for a in sys.argv[1:4])
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = PreparedData.load(prepared_dir)
    results: dict[str, Any] = {}
    for name, raw in json.loads(specs_file.read_text()):
        spec = load_spec(raw)
        parallel = Parallel.from_environment(spec, torch.device("cpu"))
        results[name] = _run(spec, prepared, out_dir / name, parallel)
        first = _run(spec, prepared, out_dir / f"{name}-split", parallel, stop_after_step=3)
        second = _run(spec, prepared, out_dir / f"{name}-split", parallel)
        results[f"{name}-split"] = {"first": first, "second": second}
        if spec.training.distributed.expert_parallel:
            results[f"{name}-layer"] = _expert_parallel_equals_unsharded(spec, prepared, parallel)
    # The worker's stop file: every rank stops before the next step, together, with a checkpoint.
    spec = load_spec(json.loads(specs_file.read_text())[0][1])
    parallel = Parallel.from_environment(spec, torch.device("cpu"), run_root=out_dir / "preempted")
    if parallel.is_main:
        (out_dir / "preempted").mkdir()
        (out_dir / "preempted" / STOP_FILE).write_text("preempt")
    parallel.barrier()
    results["preempted"] = _run(spec, prepared, out_dir / "preempted", parallel)
    if dist.get_rank() == 0:
        (out_dir / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
