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


@pytest.mark.usefixtures("torch_threads_restored")
def test_cpu_time_needs_one_thread() -> None:
    with pytest.raises(SystemExit):
        estimates.main(["--quick", "--threads", "2", "--cpu-time"])
