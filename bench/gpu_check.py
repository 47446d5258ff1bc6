"""``make gpu-check``: does this machine's GPU run what the engine needs? Prints one JSON document.

On a CUDA machine it runs, each guarded (one failing check never hides the others):

- ``autocast``: engine training steps under bf16 and fp16 autocast (fp16 with a gradient scaler);
- ``fused_adamw``: ``AdamW(fused=True)`` against the loop implementation on the same gradients;
- ``grouped_expert_matmul``: ``workers.engine.kernels.grouped_matmul`` (``grouped_mm``) against a per-expert loop,
  forward and backward;
- ``fused_head``: ``linear_cross_entropy`` (the output head and its loss in one function) and ``head_loss`` (the
  same without logits, what a training step runs) against ``F.cross_entropy(F.linear(...))``, loss and gradients;
- ``ddp_2gpu``: one DistributedDataParallel step on 2 GPUs (NCCL) when two exist: both ranks' gradients equal;
- ``engine_vs_hf``: the engine and Hugging Face's Mixtral (transformers, the ``bench`` extra; built from a config,
  nothing downloaded) on the same shape, side by side: tokens/s and MFU against the device's peak (the hardware
  profile's vendor peak when the device is known, and the best measured matmul rate in any case).

Without CUDA it runs its CPU fallback: the same JSON shape with ``"device": "cpu"``; what needs CUDA (fp16 autocast,
the 2-GPU step) is ``null`` with the reason in ``skipped``. ``tests/bench/test_gpu_check.py`` runs that fallback.
No CUDA call is made unless ``torch.cuda.is_available()``, and each is inside a check's guard.

    python -m bench.gpu_check            # the full check
    python -m bench.gpu_check --quick    # tiny shapes, a few steps (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench.engine import (
    FULL,
    QUICK,
    Shape,
    _hf_models,
    fused_adamw,
    measure_matmul_peak,
    our_spec,
    training_flops_per_token,
)
from workers.engine.hardware import CPU, profile_for_device
from workers.engine.kernels import grouped_matmul, head_loss, linear_cross_entropy
from workers.engine.model import build_model

Result = dict[str, Any]


def _skipped(reason: str) -> Result:
    return {"ok": None, "skipped": reason}


def _guard(check: Callable[[], Result]) -> Result:
    """Run one check; an exception is its result (``ok: false`` with the error), never the end of the report."""
    try:
        return check()
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "where": traceback.format_exc(limit=3)[-600:]}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


# -- the device -----------------------------------------------------------------------------------------------------


def describe_device() -> Result:
    """What runs the checks. Never raises: a CUDA that fails to answer is reported and the CPU is used."""
    info: Result = {"device": "cpu", "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                device="cuda",
                device_name=props.name,
                device_count=torch.cuda.device_count(),
                memory_bytes=int(props.total_memory),
                capability=f"{props.major}.{props.minor}",
                bf16=bool(torch.cuda.is_bf16_supported()),
            )
            return info
        info["cuda_unavailable"] = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device"
    except Exception as exc:
        info["cuda_unavailable"] = f"CUDA failed: {exc}"
    info.update(device_name=CPU.name, device_count=1, memory_bytes=CPU.memory_bytes, bf16=CPU.supports("bf16"))
    return info


# -- the checks -----------------------------------------------------------------------------------------------------


def _tokens(shape: Shape, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), generator=generator).to(device)


def autocast_steps(device: str, dtype: torch.dtype, shape: Shape, steps: int) -> Result:
    """Engine training steps under autocast in ``dtype`` (fp16 with a gradient scaler): finite losses that fall."""
    torch.manual_seed(0)
    model = build_model(our_spec(shape, experts=8)).to(device).train()
    optimizer = fused_adamw(model, lr=3e-3)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    ids = _tokens(shape, device)
    losses = []
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype):
            loss = model(ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        model.update_router_biases()
        losses.append(float(loss.detach()))
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    finite = all(math.isfinite(v) for v in losses)
    return {
        "ok": finite and losses[-1] < losses[0],
        "losses": [round(v, 4) for v in losses],
        "ms_per_step": round(seconds * 1000, 2),
    }


def fused_adamw_check(device: str, steps: int) -> Result:
    """``AdamW(fused=True)`` and the loop version from the same start on the same gradients: the same weights."""
    torch.manual_seed(0)
    params = [torch.randn(256, 256, device=device), torch.randn(1024, device=device)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(steps)]
    finals, timings = {}, {}
    for name, fused in (("fused", True), ("loop", False)):
        copies = [p.clone().requires_grad_(True) for p in params]
        optimizer = torch.optim.AdamW(copies, lr=1e-3, fused=fused, foreach=False)
        _sync(device)
        start = time.perf_counter()
        for step_grads in grads:
            for p, g in zip(copies, step_grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        _sync(device)
        timings[name] = (time.perf_counter() - start) / steps
        finals[name] = [p.detach() for p in copies]
    diff = max(_max_diff(a, b) for a, b in zip(finals["fused"], finals["loop"], strict=True))
    return {
        "ok": diff < 1e-5,
        "max_abs_diff": diff,
        "ms_per_step": {k: round(v * 1000, 3) for k, v in timings.items()},
    }


def grouped_matmul_check(device: str, dtype: torch.dtype) -> Result:
    """The engine's grouped expert matmul against a per-expert loop, forward and both gradients."""
    torch.manual_seed(0)
    experts, k, n = 8, 128, 256
    counts = torch.tensor([5, 0, 17, 9, 3, 30, 1, 7], device=device)
    x = torch.randn(int(counts.sum()), k, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(experts, k, n, device=device, dtype=dtype, requires_grad=True)
    out = grouped_matmul(x, w, counts)
    out.backward(torch.ones_like(out))
    gx, gw = x.grad.clone(), w.grad.clone()  # type: ignore[union-attr]
    x.grad, w.grad = None, None
    pieces, start = [], 0
    for e, rows in enumerate(counts.tolist()):
        pieces.append(x[start : start + rows] @ w[e])
        start += rows
    reference = torch.cat(pieces)
    reference.backward(torch.ones_like(reference))
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    diffs = {
        "out": _max_diff(out, reference),
        "grad_x": _max_diff(gx, x.grad),  # type: ignore[arg-type]
        "grad_w": _max_diff(gw, w.grad),  # type: ignore[arg-type]
    }
    scale = float(reference.abs().max())
    return {
        "ok": all(d <= tolerance * max(1.0, scale) for d in diffs.values()),
        "dtype": str(dtype).removeprefix("torch."),
        "path": "grouped_mm" if hasattr(F, "grouped_mm") else "loop",
        "max_abs_diff": diffs,
    }


def fused_head_check(device: str, dtype: torch.dtype) -> Result:
    """``linear_cross_entropy`` and ``head_loss`` (a training step's head, gradients computed in its forward)
    against ``F.cross_entropy(F.linear(...))``: loss and gradients, under autocast."""
    torch.manual_seed(0)
    rows, width, vocab = 96, 64, 1000
    x = torch.randn(rows, width, device=device, requires_grad=True)
    weight = torch.randn(vocab, width, device=device, requires_grad=True) * 0.05
    weight = weight.detach().requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), device=device)
    enabled = dtype != torch.float32
    with torch.autocast(device, dtype=dtype, enabled=enabled):
        reference = F.cross_entropy(F.linear(x, weight).float(), targets)
    reference.backward()
    want = (float(reference), x.grad.clone(), weight.grad.clone())  # type: ignore[union-attr]
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    out: Result = {"dtype": str(dtype).removeprefix("torch.")}
    ok = True
    for name in ("linear_cross_entropy", "head_loss"):
        x.grad, weight.grad = None, None
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            loss = linear_cross_entropy(x, weight, targets)[0] if name != "head_loss" else head_loss(x, weight, targets)
        loss.backward()
        diffs = {
            "loss": abs(float(loss) - want[0]),
            "grad_x": _max_diff(x.grad, want[1]),  # type: ignore[arg-type]
            "grad_w": _max_diff(weight.grad, want[2]),  # type: ignore[arg-type]
        }
        ok = ok and all(d <= tolerance for d in diffs.values())
        out[name] = diffs
    return {"ok": ok, **out}


def _ddp_rank(rank: int, world: int, port: int, results: Any) -> None:  # pragma: no cover (CUDA only)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        torch.cuda.set_device(rank)
        torch.manual_seed(0)
        model = DistributedDataParallel(torch.nn.Linear(64, 64).cuda(rank), device_ids=[rank])
        x = torch.randn(8, 64, device=f"cuda:{rank}") * (rank + 1)  # different data per rank
        start = time.perf_counter()
        model(x).square().mean().backward()
        torch.cuda.synchronize(rank)
        results[rank] = (model.module.weight.grad.cpu(), time.perf_counter() - start)
    finally:
        dist.destroy_process_group()


def ddp_check() -> Result:
    """One DDP step on 2 GPUs: after the all-reduce both ranks hold the same gradient."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_rank, args=(2, port, results), nprocs=2, join=True)
    (g0, t0), (g1, t1) = results[0], results[1]
    diff = _max_diff(g0, g1)
    return {"ok": diff == 0.0, "max_abs_grad_diff_between_ranks": diff, "step_ms": round(max(t0, t1) * 1000, 2)}


def engine_vs_hf(
    device: str, dtype: torch.dtype, shape: Shape, steps: int, peak: float | None, measured: float
) -> Result:
    """The engine and Hugging Face's Mixtral on one shape, interleaved: tokens/s and MFU."""
    spec = our_spec(shape, experts=8)
    flops_per_token = training_flops_per_token(spec)
    builders: dict[str, Callable[[], torch.nn.Module]] = {"engine": lambda: build_model(spec)}
    hf_missing = None
    try:
        builders["hf_mixtral"] = _hf_models(shape, experts=8)["mixtral"]
    except ImportError:
        hf_missing = "transformers is not installed (pip install -e '.[bench]'; make gpu-check installs it)"
    ids = _tokens(shape, device)
    tokens = shape.batch * shape.seq_len
    out: Result = {"shape": vars(shape), "dtype": str(dtype).removeprefix("torch."), "flops_per_token": flops_per_token}
    enabled = dtype != torch.float32
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build().to(device).train()
        optimizer = fused_adamw(model, lr=1e-4)
        ours = name == "engine"
        times = []
        for step in range(steps + 1):  # the first step warms up (allocations, kernel choice) and is not timed
            _sync(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                # Ours as the engine's training step calls it (no logits), as bench.engine times it.
                if ours:
                    loss = model(ids, labels=ids, return_logits=False).loss
                else:
                    loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            if ours:
                model.update_router_biases()  # type: ignore[operator]
            _sync(device)
            if step:
                times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        rate = tokens / seconds
        out[name] = {
            "tokens_per_s": round(rate, 1),
            "ms_per_step": round(seconds * 1000, 2),
            "mfu": None if peak is None else round(flops_per_token * rate / peak, 4),
            "mfu_vs_measured_matmul": round(flops_per_token * rate / measured, 4),
        }
        del model, optimizer
    if hf_missing:
        out["hf_mixtral"] = None
        out["skipped"] = {"hf_mixtral": hf_missing}
    return {"ok": True, **out}


# -- the report -----------------------------------------------------------------------------------------------------


def run_checks(quick: bool = False) -> Result:
    """Every check on the best device here; the JSON document ``main`` prints."""
    info = describe_device()
    device = info["device"]
    cuda = device == "cuda"
    shape = QUICK if quick else FULL
    steps = 3 if quick else 20
    low = torch.bfloat16 if (not cuda or info.get("bf16")) else torch.float16
    profile = profile_for_device("cuda", info["device_name"]) if cuda else CPU
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(low, "fp32") if cuda else "fp32"
    peak = profile.peak_flops.get(precision) if profile is not None else None
    compute_dtype = low if cuda else torch.float32
    # FLOP/s, as the report has always stated it and as the MFU below divides by (bench.engine's figure is GFLOP/s).
    measured = measure_matmul_peak(512 if quick else 4096, 3 if quick else 10, compute_dtype, device) * 1e9
    report: Result = {
        **info,
        "precision": precision,
        "peak_flops": {
            "profile": profile.key if profile is not None else None,
            "vendor": peak,
            "measured_matmul": round(measured, 1),
            **({} if profile is not None else {"note": f"no hardware profile matches {info['device_name']!r}"}),
        },
        "checks": {},
    }
    checks = report["checks"]
    no_cuda = "needs CUDA: " + str(info.get("cuda_unavailable", "no CUDA device"))
    checks["autocast_bf16"] = (
        _guard(lambda: autocast_steps(device, torch.bfloat16, shape, steps))
        if (not cuda or info.get("bf16"))
        else _skipped("this GPU has no bf16")
    )
    checks["autocast_fp16"] = (
        _guard(lambda: autocast_steps(device, torch.float16, shape, steps))
        if cuda
        else _skipped(f"fp16 autocast training {no_cuda}")
    )
    checks["fused_adamw"] = _guard(lambda: fused_adamw_check(device, steps))
    checks["grouped_expert_matmul"] = _guard(lambda: grouped_matmul_check(device, low if cuda else torch.float32))
    checks["fused_head"] = _guard(lambda: fused_head_check(device, low))
    count = int(info.get("device_count", 0)) if cuda else 0
    checks["ddp_2gpu"] = (
        _guard(ddp_check) if count >= 2 else _skipped(f"needs 2 CUDA devices; found {count}" if cuda else no_cuda)
    )
    timed = 1 if quick else steps
    checks["engine_vs_hf"] = _guard(lambda: engine_vs_hf(device, compute_dtype, shape, timed, peak, measured))
    report["ok"] = all(c.get("ok") is not False for c in checks.values())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and a few steps")
    args = parser.parse_args(argv)
    report = run_checks(quick=args.quick)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
