"""The engine benchmark (``make bench``) in its quick mode: it runs, and reports this engine's throughput."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from bench import engine


@pytest.fixture
def torch_threads_restored() -> Iterator[None]:
    """The bench sets torch's thread count for its process; tests that run after it keep theirs."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.mark.usefixtures("torch_threads_restored")
def test_bench_quick_runs_without_hugging_face(capsys: pytest.CaptureFixture[str]) -> None:
    assert engine.main(["--quick", "--no-hf", "--no-thp", "--rounds", "1", "--warmup", "0", "--experts", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["results"]["4"]["ours"]["tokens_per_s"] > 0
    assert any("skipped" in note for note in report["notes"])


@pytest.mark.usefixtures("torch_threads_restored")
def test_bench_quick_times_the_deepseek_v3_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert engine.main(["--quick", "--deepseek-only", "--no-thp", "--rounds", "1", "--warmup", "0"]) == 0
    section = json.loads(capsys.readouterr().out)["deepseek_v3"]
    assert set(section) == {
        "default",
        "attention_gqa",
        "attention_mla",
        "mtp_depth_1",
        "optimizer_adafactor",
        "optimizer_sgd",
        "optimizer_muon",
    }
    for name, entry in section.items():
        assert entry["tokens_per_s"] > 0, name
        assert entry["kv_cache_bytes_per_token"] == entry["kv_cache_bytes_per_token_measured"], name
        assert entry["optimizer_state_bytes"] == entry["optimizer_state_bytes_predicted"], name
    assert section["attention_mla"]["kv_cache_bytes_per_token"] < section["default"]["kv_cache_bytes_per_token"]
