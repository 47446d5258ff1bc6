"""The learning-per-second benchmark (``python -m bench.learning``) in its quick mode: both models train for the
same time, and each reports a validation-loss curve against training seconds."""

from __future__ import annotations

import json
import math

import pytest

from bench import learning
from bench.engine import cpu_device_label
from workers.engine.sinks import MemorySink


@pytest.mark.usefixtures("torch_threads_restored")
def test_the_moe_and_its_dense_twin_train_for_the_same_time_and_report_loss_curves(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert learning.main(["--quick", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == cpu_device_label(1)
    models = report["models"]
    assert set(models) == {"moe", "dense"}
    shape = report["shape"]
    assert shape["dense_hidden_size"] == (shape["top_k"] + shape["shared_experts"]) * shape["expert_hidden_size"]
    # The same active matmul work per token, up to the router's (E, C) matrix in each MoE layer.
    router = shape["routed_experts"] * shape["hidden_size"] * (shape["layers"] - shape["first_dense_layers"])
    assert models["moe"]["active_matmul_parameters"] == models["dense"]["active_matmul_parameters"] + router
    assert models["moe"]["parameters"] > models["dense"]["parameters"]
    uniform = math.log(shape["vocab"])
    for name, entry in models.items():
        curve = entry["curve"]
        assert len(curve) >= 2, name
        steps = [point["step"] for point in curve]
        seconds = [point["seconds"] for point in curve]
        assert steps == sorted(set(steps)) and steps[-1] == entry["steps"], name
        # The last point's clock is all the training time (figures rounded to 0.01 s and 0.1 s).
        assert seconds == sorted(seconds) and abs(seconds[-1] - entry["train_seconds"]) <= 0.06, name
        assert 0 < entry["final_val_loss"] == curve[-1]["val_loss"] < uniform, name
        assert entry["step_ms_median"] > 0, name
        # Passes over the corpus: about the steps' tokens over the train split's.
        passes = entry["steps"] * shape["batch"] * shape["seq_len"] / report["train_tokens"]
        assert entry["epochs"] == pytest.approx(passes, rel=0.05), name
        assert 0 < entry["final_train_loss"] < uniform, name
        assert entry["anomalies"] == 0 and isinstance(entry["interventions"], list), name
    # Compared at the shorter run's end, where both curves have a value.
    assert report["compared_at_seconds"] == min(m["curve"][-1]["seconds"] for m in models.values())
    assert all(value is not None for value in report["val_loss_at_compared_seconds"].values())
    paired = report["side_by_side"]
    dense_span = (models["dense"]["curve"][0]["seconds"], models["dense"]["curve"][-1]["seconds"])
    assert all(dense_span[0] <= row["seconds"] <= dense_span[1] for row in paired)
    ahead = sum(row["moe"] < row["dense"] for row in paired)
    assert report["moe_ahead_at_evaluations"] == ahead and report["evaluations_compared"] == len(paired)
    for entry in models.values():
        assert entry["best_val_loss"] == min(point["val_loss"] for point in entry["curve"])


def test_side_by_side_pairs_each_moe_evaluation_with_the_dense_curve_at_the_same_seconds() -> None:
    moe = [{"step": 10, "seconds": 1.0, "val_loss": 5.0}, {"step": 20, "seconds": 2.5, "val_loss": 4.0}]
    dense = [{"step": 15, "seconds": 1.5, "val_loss": 4.8}, {"step": 30, "seconds": 3.5, "val_loss": 3.8}]
    # 1.0 s is before the dense curve's first evaluation; 2.5 s is halfway between its two.
    assert learning.side_by_side(moe, dense) == [{"seconds": 2.5, "moe": 4.0, "dense": 4.3}]


def test_a_curve_is_interpolated_between_evaluations_and_is_none_outside_them() -> None:
    curve = [{"step": 10, "seconds": 1.0, "val_loss": 5.0}, {"step": 20, "seconds": 3.0, "val_loss": 4.0}]
    assert learning.loss_at(curve, 2.0) == 4.5
    assert learning.loss_at(curve, 3.0) == 4.0
    assert learning.loss_at(curve, 0.5) is None and learning.loss_at(curve, 3.5) is None


def test_interventions_are_listed_at_the_training_seconds_they_came_with_what_they_set() -> None:
    sink = MemorySink()
    for step in range(1, 5):
        sink.emit(step, {"step_time_s": 0.5})
    changes = {
        "lr": {"before": 0.002, "after": 0.0006},
        "lr_scale": {"before": 1.0, "after": 0.3},
        "dropout": {"before": 0.0, "after": 0.2},
    }
    sink.event("intervention", {"step": 3, "changes": changes})
    assert learning.interventions(sink) == [{"step": 3, "seconds": 1.5, "changes": {"lr_scale": 0.3, "dropout": 0.2}}]


def test_a_candidate_setting_changes_the_moe_and_the_dense_twin_stays_dense_at_the_same_active_size() -> None:
    from builder.configs.presets import PRESETS

    template = PRESETS[learning.TEMPLATE].spec
    plain = learning.moe_and_dense(template)
    specs = learning.moe_and_dense(learning.candidate(template, first_dense_layers=0, batch_size=16, dropout=0.2))
    moe, dense = specs["moe"].model, specs["dense"].model
    assert template.model.moe.first_dense_layers == 1  # the template's own: a dense first layer
    assert moe.moe.first_dense_layers == 0 and moe.num_moe_layers == template.model.num_layers
    assert (
        dense.num_moe_layers == 0
        and dense.moe.resolved_dense_hidden_size == plain["dense"].model.moe.resolved_dense_hidden_size
    )
    assert specs["moe"].training.batch_size == specs["dense"].training.batch_size == 16
    assert moe.dropout == dense.dropout == 0.2
    # Everything else is the template's.
    assert moe.moe.num_routed_experts == template.model.moe.num_routed_experts
    assert specs["moe"].training.optimizer == template.training.optimizer
    # A router candidate changes the MoE's router only; the dense twin has none to change.
    routed = learning.moe_and_dense(
        learning.candidate(template, scoring="sigmoid", routed_scaling_factor=1.0, balancing="aux_loss")
    )
    router = routed["moe"].model.moe
    assert (router.scoring, router.routed_scaling_factor, router.balancing) == ("sigmoid", 1.0, "aux_loss")
    assert template.model.moe.scoring == "softmax" and template.model.moe.routed_scaling_factor == 4.0
    assert routed["dense"].model.num_moe_layers == 0
    assert routed["dense"].model.moe.resolved_dense_hidden_size == plain["dense"].model.moe.resolved_dense_hidden_size
