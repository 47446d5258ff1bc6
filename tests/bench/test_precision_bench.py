"""The bf16-against-fp32 benchmark (``python -m bench.precision``) in its quick mode: it runs and reports every
figure the issue asks for."""

from __future__ import annotations

import json
import os

import pytest

from bench import precision
from bench.engine import cpu_device_label
from workers.engine import model as model_module


@pytest.mark.usefixtures("torch_threads_restored")
def test_precision_bench_quick_reports_speed_and_validation_loss(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    padding = model_module.CPU_LOW_PRECISION_GROUP_ROWS
    assert precision.main(["--quick", "--rounds", "1", "--threads", "1", "--no-thp"]) == 0
    assert padding == model_module.CPU_LOW_PRECISION_GROUP_ROWS  # the unpadded variant restored it
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ  # --no-thp: torch was not asked for huge pages
    report = json.loads(capsys.readouterr().out)
    assert report["THP_MEM_ALLOC_ENABLE"] is None
    assert report["device"] == cpu_device_label(1)
    step = report["step"]
    assert set(step["variants"]) == {"fp32", "bf16", "bf16_unpadded"}
    assert all(v["tokens_per_s"] > 0 for v in step["variants"].values())
    assert step["variants"]["fp32"]["speedup_vs_fp32"] == 1.0
    assert step["matmul"]["fp32_gflops_median"] > 0 and step["matmul"]["bf16_gflops_median"] > 0
    demo = report["tiny_demo"]
    assert set(demo["variants"]) == {"fp32", "bf16"}
    for variant in demo["variants"].values():
        assert variant["steps"] == 12 and variant["val_loss_curve"][-1][0] == 12
        assert 0 < variant["val_loss"] < 10  # ln(2048) = 7.6 at random; 12 steps move it a little
    relative = (demo["variants"]["bf16"]["val_loss"] - demo["variants"]["fp32"]["val_loss"]) / demo["variants"]["fp32"][
        "val_loss"
    ]
    assert demo["bf16_val_loss_relative_difference"] == pytest.approx(relative, abs=1e-4)
    assert demo["target_met"] == (abs(relative) <= 0.02)
