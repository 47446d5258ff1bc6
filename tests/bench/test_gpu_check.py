"""``make gpu-check``'s script in its quick mode. Here (no CUDA) that is its CPU fallback: the same JSON shape, the
CUDA-only checks null with the reason, and every other check really run and passing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import gpu_check


def test_the_gpu_check_runs_and_reports_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    previous_threads = torch.get_num_threads()
    try:
        code = gpu_check.main(["--quick"])
    finally:
        torch.set_num_threads(previous_threads)
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] is True, report
    checks = report["checks"]
    assert set(checks) == {
        "autocast_bf16", "autocast_fp16", "fused_adamw", "grouped_expert_matmul", "fused_head", "ddp_2gpu",
        "engine_vs_hf",
    }  # fmt: skip
    if report["device"] == "cpu":
        assert not torch.cuda.is_available()
        for cuda_only in ("autocast_fp16", "ddp_2gpu"):
            assert checks[cuda_only]["ok"] is None and "CUDA" in checks[cuda_only]["skipped"]
    losses = checks["autocast_bf16"]["losses"]
    assert checks["autocast_bf16"]["ok"] and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert checks["fused_adamw"]["ok"] and checks["fused_adamw"]["max_abs_diff"] < 1e-5
    assert checks["grouped_expert_matmul"]["ok"] and checks["fused_head"]["ok"]
    assert set(checks["fused_head"]) >= {"linear_cross_entropy", "head_loss"}
    side_by_side = checks["engine_vs_hf"]
    for name in ("engine", "hf_mixtral"):  # transformers is a dev dependency: both run here
        assert side_by_side[name]["tokens_per_s"] > 0
        assert 0 < side_by_side[name]["mfu_vs_measured_matmul"] < 1
    # In FLOP/s, as before bench.engine's measure_matmul_peak (GFLOP/s) served it: any CPU passes 0.1 GFLOP/s, and
    # the MFU above (under 1) divides by the same figure.
    assert report["peak_flops"]["measured_matmul"] > 1e8
