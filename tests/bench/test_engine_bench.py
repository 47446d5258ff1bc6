"""The engine benchmark (``make bench``) in its quick mode: it runs, and reports this engine's throughput."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import pytest
import torch

from bench import engine


@pytest.mark.usefixtures("torch_threads_restored")
def test_bench_quick_runs_without_hugging_face(capsys: pytest.CaptureFixture[str]) -> None:
    assert engine.main(["--quick", "--no-hf", "--no-thp", "--rounds", "1", "--warmup", "0", "--experts", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["results"]["4"]["ours"]["tokens_per_s"] > 0
    assert any("skipped" in note for note in report["notes"])
    assert report["kernel_floor_ms"]["4"]["median"]["total"] > 0  # timed without Hugging Face's models too
    assert report["device"] == engine.cpu_device_label(2)  # --threads' default


@pytest.mark.usefixtures("torch_threads_restored")
def test_the_kernel_floor_lies_under_every_model_and_the_comparison_counts_from_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The shared kernels timed alone take less than any model's step that runs them and more; the comparison's
    part above the floor is ours' step minus that floor."""
    args = ["--quick", "--no-thp", "--no-deepseek", "--rounds", "2", "--warmup", "1", "--experts", "4"]
    assert engine.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    floor = report["kernel_floor_ms"]["4"]
    for stat in ("median", "min"):
        parts = floor[stat]
        assert set(parts) == {*engine.FLOOR_PARTS, "total"}
        assert all(parts[part] > 0 for part in engine.FLOOR_PARTS), parts
        assert parts["total"] >= max(parts[part] for part in engine.FLOOR_PARTS)
    group = report["results"]["4"]
    assert {"ours", "mixtral"} <= set(group)
    for name, entry in group.items():
        assert floor["min"]["total"] < entry["step_ms_min"], name
    median = report["comparison"]["4"]["median"]
    above = median["kernel_floor"]
    assert above["ours_above_floor_ms"] == pytest.approx(
        group["ours"]["step_ms_median"] - floor["median"]["total"], abs=0.15
    )
    best = group[median["best_hf"]]["step_ms_median"]
    assert above["best_hf_above_floor_ms"] == pytest.approx(best - floor["median"]["total"], abs=0.15)
    assert any("kernel_floor_ms" in note for note in report["notes"])


def test_the_floor_comparison_says_what_the_target_asks_of_the_part_above_the_floor() -> None:
    # Today's figures at 8 experts: the best Hugging Face step 444 ms, ours 402, the floor 283.
    entry = engine.floor_comparison(444.0, 402.0, 283.0, 1.15)
    assert entry["ours_above_floor_ms"] == 119.0
    assert entry["best_hf_above_floor_ms"] == 161.0
    assert entry["ours_above_floor_for_target_ms"] == pytest.approx(444 / 1.15 - 283, abs=0.05)  # 103.1
    assert entry["ours_above_floor_cut_needed"] == pytest.approx(1 - (444 / 1.15 - 283) / 119, abs=5e-4)  # 0.134
    assert entry["ours_over_best_hf_if_nothing_above_floor"] == pytest.approx(444 / 283, abs=5e-4)
    # A step already at the target needs nothing cut.
    assert engine.floor_comparison(460.0, 400.0, 300.0, 1.15)["ours_above_floor_cut_needed"] == 0.0


def test_every_cpu_bench_names_its_device_as_before() -> None:
    """bench.engine, bench.compile, bench.learning and bench.precision each wrote this string themselves (their
    smoke tests check that they now take it from here); the reports' values stay as they were."""
    assert engine.cpu_device_label(3) == f"cpu ({platform.processor() or platform.machine()}), 3 threads"


@pytest.mark.usefixtures("torch_threads_restored")
def test_the_fresh_harness_splits_every_step_by_component(capsys: pytest.CaptureFixture[str]) -> None:
    """--fresh rebuilds the models before each timed step; every model's profiled step is split by component."""
    args = ["--quick", "--no-hf", "--no-thp", "--no-deepseek", "--fresh", "--rounds", "2", "--warmup", "0"]
    assert engine.main([*args, "--experts", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["harness"] == "fresh"
    entry = report["results"]["4"]["ours"]
    components = entry["components"]
    assert set(components) == set(engine.COMPONENTS)
    assert sum(c["share"] for c in components.values()) == pytest.approx(1.0, abs=0.01)
    for name in ("attention", "norms", "experts", "head", "optimizer"):
        assert components[name]["share"] > 0, name  # each one found in the profile, forward or backward
    for name in ("attention", "experts", "head"):
        assert components[name]["mfu"] is not None and components[name]["mfu"] > 0, name
    assert components["optimizer"]["mfu"] is None


def test_components_attribute_backward_to_the_forward_range() -> None:
    """A backward matmul counts for the module whose forward made it: the expert-heavy model's experts dominate."""
    spec = engine.our_spec(engine.QUICK, 4)
    raw = spec.model_dump(mode="json")
    raw["model"]["moe"]["expert_hidden_size"] = 512  # experts 8x wider than attention's projections
    wide = engine.Spec.model_validate(raw)
    model, optimizer = engine._seeded_build(lambda: engine.build_model(wide))
    runner = engine.Runner("ours", 4, model, optimizer, True, [])
    ids = torch.randint(0, engine.QUICK.vocab, (4, engine.QUICK.seq_len))
    shares = engine.component_shares(runner, ids, steps=2)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["experts"] > shares["attention"] and shares["experts"] > shares["norms"]


@pytest.mark.usefixtures("torch_threads_restored")
def test_bench_quick_times_the_deepseek_v3_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        engine.main(["--quick", "--deepseek-only", "--no-wall-time", "--no-thp", "--rounds", "1", "--warmup", "0"]) == 0
    )
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


@pytest.mark.usefixtures("torch_threads_restored")
def test_the_tiny_demo_trains_for_the_same_time_with_each_choice(tmp_path: Path) -> None:
    """The same-wall-time section at a smoke-test size (12 AdamW steps of budget, 20 help topics of corpus)."""
    torch.set_num_threads(1)
    same = engine.tiny_demo_same_wall_time(tmp_path, 12, 3, 12, corpus_examples=20)
    variants = same["variants"]
    assert set(variants) == {"adamw", "muon", "adamw_mtp_depth_1"}
    assert variants["adamw"]["steps"] == 12 and same["calibration_steps"] == 3
    uniform = math.log(2048)  # the template's vocabulary: the loss of a uniform guess
    for name, entry in variants.items():
        assert entry["steps"] > same["calibration_steps"] and entry["val_loss_step"] == entry["steps"], name
        assert 0 < entry["val_loss"] < uniform, name  # trained down from the start
        assert (entry["mtp_loss_last_50_mean"] is not None) == (name == "adamw_mtp_depth_1"), name
    assert variants["muon"]["optimizer"] == "muon" and variants["adamw_mtp_depth_1"]["mtp_depth"] == 1


def _same_wall_time_specs(tmp_path: Path, bad: dict[str, object]) -> tuple[dict[str, engine.Spec], engine.PreparedData]:
    """The tiny demo template at a smoke-test size, and a twin changed by ``bad`` (training fields)."""
    from builder.configs.presets import PRESETS
    from workers.engine.data import prepare

    base = PRESETS["tiny-cpu-demo"].spec
    schedule = {**base.training.schedule.model_dump(), "warmup_steps": 6}
    quick = {"max_steps": 24, "schedule": schedule, "checkpoint_interval": 10_000_000, "eval_interval": 8}
    specs = {"good": engine._variant(base, training=quick), "bad": engine._variant(base, training={**quick, **bad})}
    corpus = engine.write_demo_corpus(tmp_path / "corpus.jsonl", 20)
    return specs, prepare(specs["good"], corpus, tmp_path / "prepared")


@pytest.mark.usefixtures("torch_threads_restored")
def test_a_failing_model_stops_the_same_wall_time_run_with_its_reason(tmp_path: Path) -> None:
    """A run whose anomaly guard stops it is not resumed chunk after chunk: the comparison fails, naming it."""
    torch.set_num_threads(1)
    # Every rise of the loss above the window's mean is an anomaly, and its action is to stop the run.
    anomaly = {"enabled": True, "window": 3, "threshold": 1e-6, "action": "stop", "max_rollbacks": 0}
    specs, prepared = _same_wall_time_specs(tmp_path, {"optimizer": {"name": "adamw", "lr": 1.0}, "anomaly": anomaly})
    with pytest.raises(engine.SameWallTimeError, match=r"^bad ended failed at step \d+: "):
        engine.train_same_wall_time(specs, prepared, tmp_path, lambda calibrated: 24 * calibrated["good"], 6, 6)


@pytest.mark.usefixtures("torch_threads_restored")
def test_a_model_that_stops_early_ends_its_curve_while_the_others_train_on(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    # No evaluation improves by 10 nats on the one before: the run stops at its second evaluation.
    plateau = {"enabled": False, "min_delta": 10.0}
    specs, prepared = _same_wall_time_specs(tmp_path, {"early_stopping_patience": 1, "plateau": plateau})
    run = engine.train_same_wall_time(specs, prepared, tmp_path, lambda calibrated: 24 * calibrated["good"], 6, 6, 3)
    good_steps = [step for step, _ in run.sinks["good"].series("loss")]
    bad_steps = [step for step, _ in run.sinks["bad"].series("loss")]
    assert good_steps[-1] == run.specs["good"].training.max_steps
    # Trained to its second evaluation and not one step further, each step once (not resumed again and again).
    evaluations = [step for step, _ in run.sinks["bad"].series("val_loss")]
    assert len(evaluations) == 2 and bad_steps[-1] == evaluations[-1] < run.specs["bad"].training.max_steps
    assert bad_steps == list(range(1, bad_steps[-1] + 1))
