"""The compile benchmark (``python -m bench.compile``) in its quick mode: it compiles, times and reports."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import torch

from bench import compile as compile_bench
from bench.engine import cpu_device_label


@pytest.fixture
def restored() -> Iterator[None]:
    """The bench sets torch's thread count and Inductor's cache folder for its process; later tests keep theirs."""
    threads, cache = torch.get_num_threads(), os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    yield
    torch.set_num_threads(threads)
    if cache is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache


@pytest.mark.usefixtures("restored")
def test_bench_quick_compiles_and_times_eager_against_compiled(capsys: pytest.CaptureFixture[str]) -> None:
    assert compile_bench.main(["--quick", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    case = report["results"]["bench_quick_4_experts"]
    assert case["eager"]["step_ms_median"] > 0 and case["compiled"]["step_ms_median"] > 0
    compiled = case["compiled"]
    # The first compiled step compiled the model: far longer than a step of this tiny shape.
    assert compiled["compile_s"] > 1.0 and compiled["compile_s"] >= compiled["compile_warm_s"]
    assert compiled["ratio_to_eager"] == pytest.approx(
        compiled["step_ms_median"] / case["eager"]["step_ms_median"], rel=0.01
    )
    assert len(report["load_average_before"]) == 3
    assert report["device"] == cpu_device_label(1)
