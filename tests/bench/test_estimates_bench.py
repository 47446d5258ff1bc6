"""The estimator benchmark (``python -m bench.estimates``) in its quick mode: it runs and reports the tiny demo's
predicted and measured step, their ratio and the calibrated prediction. Whether the ratios meet the targets is the
benchmark's report, not this test's."""

from __future__ import annotations

import json
import math

import pytest

from bench import estimates


@pytest.mark.usefixtures("torch_threads_restored")
@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_quick_reports_the_tiny_demo(clock: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--quick", "--threads", "1"] + (["--cpu-time"] if clock == "cpu" else [])
    assert estimates.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clock"] == ("thread_cpu_time" if clock == "cpu" else "wall")
    assert report["threads"] == 1 and report["profile_name"] == "This CPU (1 core)"
    entry = report["results"]["tiny-cpu-demo"]
    assert entry["template"] and entry["measured_steps"] == 2
    assert entry["predicted_ms"] > 0 and entry["measured_ms"] > 0 and entry["calibration_step_ms"] > 0
    assert entry["ratio"] == pytest.approx(entry["measured_ms"] / entry["predicted_ms"], rel=0.01)
    # One template: the applied factor is its own, so its calibrated prediction is its calibration step.
    assert entry["calibrated_ms"] == pytest.approx(entry["calibration_step_ms"], rel=0.01)
    assert math.isfinite(entry["calibrated_error"])
    assert isinstance(report["templates_within_1_5x"], bool)
    # The prediction uses the probe's rates (what a worker advertises); the reference figures' is beside it.
    probed = report["probe"]["start"]
    assert report["profile"]["peak_flops_fp32"] == pytest.approx(probed["matmul_gflops"] * 1e9, rel=1e-3)
    assert report["profile"]["layer_overhead_seconds"] == pytest.approx(probed["layer_ms"] / 1e3, rel=1e-3)
    assert report["reference_profile"]["peak_flops_fp32"] == 190e9  # one core of the reference machine
    assert report["probe"]["end"]["threads"] == probed["threads"] == 1
    assert entry["ratio_reference_profile"] == pytest.approx(
        entry["measured_ms"] / entry["predicted_ms_reference_profile"], rel=0.01
    )
    assert entry["predicted_ms_reference_profile"] != entry["predicted_ms"]


@pytest.mark.usefixtures("torch_threads_restored")
def test_cpu_time_needs_one_thread() -> None:
    with pytest.raises(SystemExit):
        estimates.main(["--quick", "--threads", "2", "--cpu-time"])
