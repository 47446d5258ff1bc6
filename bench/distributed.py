"""Figures for multi-device training on this CPU (gloo), as JSON: ``python -m bench.distributed``.

- ``scaling``: tokens/s and step time of one job at 1 and 2 processes (``torch.distributed.run``, the launcher the
  worker uses; the global batch is the same, so 2 processes each train half of it on half the cores), median over
  the steps after the first few;
- ``communication``: what the collectives of one step cost at that shape: DDP's gradient all-reduce, FSDP2's
  parameter all-gather plus gradient reduce-scatter (flat fp32 buffers of the model's size), and the step's small
  figure all-reduce; median ms over repetitions;
- ``parity``: max |Δloss| between 2-process DDP, FSDP2 and expert-parallel runs and a 1-process run with the same
  global batch (6 steps of the tests' tiny model, ``tests/engine/distributed_run.py``), the expert-parallel layer's
  forward/gradient difference, and whether each 2-process run resumed exactly;
- ``resume_after_killed_rank``: a 2-process run with a checkpoint is SIGKILLed in one rank; seconds until the
  launcher has exited (the failure seen) and until the relaunched run has resumed from the checkpoint (its
  ``resume`` event), as the worker does it (the Celery re-dispatch adds its own second or two).

The machine is shared with other work: figures vary run to run; compare within one run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _corpus(path: Path, lines: int = 400) -> Path:
    rng = random.Random(0)
    path.write_text(
        "".join(
            json.dumps({"text": "".join(LETTERS[(s + j) % 26] for j in range(300))}) + "\n"
            for s in (rng.randrange(26) for _ in range(lines))
        )
    )
    return path


def _spec(devices: int, steps: int, **distributed: Any) -> dict[str, Any]:
    return {
        "model": {
            "vocab_size": 259,
            "hidden_size": 128,
            "num_layers": 4,
            "num_heads": 4,
            "max_seq_len": 128,
            "moe": {"num_routed_experts": 8, "top_k": 2, "expert_hidden_size": 256},
        },
        "data": {"tokenizer": "bytes", "seq_len": 128, "val_fraction": 0.05},
        "training": {
            "batch_size": 16,
            "max_steps": steps,
            "log_interval": 1,
            "eval_interval": 1000,
            "eval_batches": 1,
            "checkpoint_interval": 5,
            "schedule": {"warmup_steps": 2},
            "seed": 5,
            "distributed": {"devices": devices, **distributed},
        },
    }


def _launch(
    work: Path, name: str, raw: dict[str, Any], faults: dict[str, Any] | None = None, threads: int | None = None
) -> subprocess.Popen[bytes]:
    from workers.engine.data import prepare
    from workers.engine.distributed import launch_command, launch_environment
    from workers.engine.spec import load_spec

    spec = load_spec(raw)
    run = work / name
    run.mkdir(exist_ok=True)
    spec_file = run / "spec-in.json"
    spec_file.write_text(json.dumps(raw))
    prepared = work / "prepared"
    prepare(spec, work / "corpus.jsonl", prepared)
    devices = spec.training.distributed.devices
    command = launch_command(
        spec_file=spec_file, prepared=prepared, out_dir=run, device="cpu", devices=devices, faults=faults
    )
    env = {**launch_environment(devices, "cpu"), "PYTHONPATH": str(ROOT)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _records(run: Path) -> list[dict[str, Any]]:
    from workers.engine.sinks import read_jsonl

    path = run / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


def scaling(work: Path, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # 1 process with the worker's thread count (every core), 2 processes (a core each), and as a control 1 process
    # on one thread: on a machine loaded by other work, OpenMP's threads wait on each other far more than 2 ranks do.
    for devices, threads, key in ((1, None, "1_process"), (2, None, "2_process"), (1, 1, "1_process_1_thread")):
        name = f"scaling-{key}"
        began = time.perf_counter()
        process = _launch(work, name, _spec(devices, steps), threads=threads)
        assert process.wait(timeout=900) == 0, f"the {devices}-process run failed"
        points = [
            r["metrics"] for r in _records(work / name) if r.get("type") == "metrics" and "tokens_per_s" in r["metrics"]
        ]
        timed = points[3:]  # the first steps allocate and pick kernels
        out[key] = {
            "threads_per_process": threads or max(1, len(os.sched_getaffinity(0)) // devices),
            "tokens_per_s": round(statistics.median(p["tokens_per_s"] for p in timed), 1),
            "step_time_s": round(statistics.median(p["step_time_s"] for p in timed), 4),
            "wall_s_with_startup": round(time.perf_counter() - began, 1),
        }
    out["speedup_2_over_1"] = round(out["2_process"]["tokens_per_s"] / out["1_process"]["tokens_per_s"], 3)
    out["speedup_2_over_1_thread"] = round(
        out["2_process"]["tokens_per_s"] / out["1_process_1_thread"]["tokens_per_s"], 3
    )
    return out


_COMM_SCRIPT = r"""
import json, statistics, sys, time, torch, torch.distributed as dist
from workers.engine.model import build_model
from workers.engine.spec import load_spec
dist.init_process_group("gloo")
spec = load_spec(json.loads(sys.argv[1]))
n = sum(p.numel() for p in build_model(spec).parameters())
world, rank = dist.get_world_size(), dist.get_rank()
flat = torch.randn(n)
shard = torch.empty(-(-n // world))
full = torch.empty(shard.numel() * world)
small = torch.randn(5 + 2 * 8)
def timed(fn, reps=15):
    fn(); times = []
    for _ in range(reps):
        dist.barrier(); t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 2)
out = {
    "parameters": n,
    "gradient_bytes": n * 4,
    "ddp_gradient_all_reduce_ms": timed(lambda: dist.all_reduce(flat)),
    "fsdp_all_gather_plus_reduce_scatter_ms": timed(
        lambda: (dist.all_gather_into_tensor(full, shard), dist.reduce_scatter_tensor(shard, full))
    ),
    "step_figures_all_reduce_ms": timed(lambda: dist.all_reduce(small)),
}
if rank == 0:
    print("RESULT" + json.dumps(out))
dist.destroy_process_group()
"""


def communication() -> dict[str, Any]:
    from workers.engine.distributed import launch_environment

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_COMM_SCRIPT)
        script = f.name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script]
    env = {**launch_environment(2, "cpu"), "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            [*command, json.dumps(_spec(2, 5))], env=env, capture_output=True, text=True, timeout=600, check=True
        )
    finally:
        os.unlink(script)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    result: dict[str, Any] = json.loads(line[len("RESULT") :])
    return result


def parity(work: Path) -> dict[str, Any]:
    """The tests' 2-process runs against one process (``tests/engine/distributed_run.py``, 6 steps)."""
    from tests.engine.test_distributed import LAYOUTS
    from tests.engine.test_distributed import _spec as tiny_spec
    from workers.engine.data import prepare
    from workers.engine.distributed import launch_environment
    from workers.engine.sinks import MemorySink
    from workers.engine.train import train

    corpus = _corpus(work / "parity-corpus.jsonl", 200)
    prepared = prepare(tiny_spec({}), corpus, work / "parity-prepared")
    specs = work / "parity-specs.json"
    specs.write_text(json.dumps([[n, tiny_spec(layout).model_dump(mode="json")] for n, layout in LAYOUTS.items()]))
    out_dir = work / "parity-out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(ROOT / "tests" / "engine" / "distributed_run.py"), str(specs), str(work / "parity-prepared"), str(out_dir),
    ]  # fmt: skip
    env = {**launch_environment(2, "cpu"), "PYTHONPATH": str(ROOT)}
    subprocess.run(command, env=env, capture_output=True, timeout=600, check=True)
    two = json.loads((out_dir / "results.json").read_text())
    sink = MemorySink()
    train(tiny_spec({}), prepared, work / "parity-single", sink, device="cpu")
    one = [v for _, v in sink.series("loss")]
    out: dict[str, Any] = {"steps": len(one)}
    for name in LAYOUTS:
        diff = max(abs(a - b) for a, b in zip(two[name]["loss"], one, strict=True))
        out[name] = {
            "max_abs_delta_loss": diff,
            "resumed_exactly": two[f"{name}-split"]["second"]["loss"] == two[name]["loss"][3:],
        }
    out["ep"]["layer_forward_max_abs"] = two["ep-layer"]["forward_max_abs"]
    out["ep"]["layer_grad_max_rel"] = two["ep-layer"]["grad_max_rel"]
    return out


def _rank_process(launcher: int, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if "workers.engine.distributed" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


def _wait(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError("waited too long")


def resume_after_killed_rank(work: Path) -> dict[str, Any]:
    raw = _spec(2, 40)
    faults = {"sleep_per_step_s": 0.1}
    process = _launch(work, "killed", raw, faults)
    checkpoints = work / "killed" / "checkpoints"
    _wait(lambda: any(p.name >= "step-000005" for p in checkpoints.glob("step-*")), 600)
    victim = _wait(lambda: _rank_process(process.pid, 1), 30)
    killed = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    status = process.wait(timeout=300)
    seen = time.monotonic() - killed
    before = len([r for r in _records(work / "killed") if r.get("kind") == "resume"])
    relaunched = _launch(work, "killed", raw, faults)
    _wait(lambda: len([r for r in _records(work / "killed") if r.get("kind") == "resume"]) > before, 600)
    resumed = time.monotonic() - killed
    resume = [r for r in _records(work / "killed") if r.get("kind") == "resume"][-1]
    assert relaunched.wait(timeout=900) == 0
    return {
        "launcher_exit_status": status,
        "failure_seen_s": round(seen, 2),
        "training_again_s": round(resumed, 2),
        "resumed_from_step": resume["step"],
        "note": "engine level (launcher + relaunch); through Celery see tests/builder/test_multidevice.py's print",
    }


SECTIONS = ("scaling", "communication", "parity", "resume_after_killed_rank")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.distributed [SECTION ...]`` (default: every section); each section's figures are printed to
    stderr as soon as they exist, the whole report as JSON to stdout."""
    chosen = (argv if argv is not None else sys.argv[1:]) or list(SECTIONS)
    load = os.getloadavg()
    report: dict[str, Any] = {
        "machine": {"cores": len(os.sched_getaffinity(0)), "load_average_1m_at_start": round(load[0], 2)}
    }
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        work = Path(tmp)
        _corpus(work / "corpus.jsonl")
        runs = {
            "scaling": lambda: scaling(work, steps=10),
            "communication": communication,
            "parity": lambda: parity(work),
            "resume_after_killed_rank": lambda: resume_after_killed_rank(work),
        }
        for name in chosen:
            report[name] = runs[name]()
            print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)
    report["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
