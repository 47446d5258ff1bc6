"""The training loop's watchers on their own: no model, a ``LoopState`` and a ``MemorySink``.

Their effect inside a real run (rollbacks, interventions, exact resume) is tested in ``test_train.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.engine.interventions import AnomalyGuard, PlateauWatch
from workers.engine.sinks import MemorySink
from workers.engine.spec import AnomalySpec, PlateauSpec, TrainingSpec
from workers.engine.train import LoopState


def test_the_guard_calls_a_non_finite_loss_at_once_and_a_spike_only_against_a_full_window(tmp_path: Path) -> None:
    guard = AnomalyGuard(AnomalySpec(window=3, threshold=6.0), MemorySink(), tmp_path)
    state = LoopState()
    nan = guard.check_loss(state, 1, float("nan"))
    assert nan is not None and (nan["kind"], nan["action"]) == ("non_finite_loss", "rollback")
    assert guard.check_loss(state, 1, 100.0) is None  # no history yet
    for loss in (2.0, 2.1, 1.9, 2.0):
        guard.accept(state, loss)
    assert state.loss_window == [2.1, 1.9, 2.0]  # the newest `window` losses
    assert guard.check_loss(state, 5, 2.3) is None
    spike = guard.check_loss(state, 5, 100.0)
    assert spike is not None and (spike["kind"], spike["action"]) == ("loss_spike", "rollback")
    assert guard.check_grad_norm(state, 5, 2.0, float("inf")) is not None
    assert guard.check_grad_norm(state, 5, 2.0, 1.5) is None
    assert AnomalyGuard(AnomalySpec(enabled=False), MemorySink(), tmp_path).check_loss(state, 5, float("nan")) is None


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (AnomalySpec(action="stop"), "anomaly.action is stop"),
        (AnomalySpec(max_rollbacks=0), "max_rollbacks (0) reached"),
        (AnomalySpec(), "no valid checkpoint to roll back to"),
    ],
)
def test_the_guard_reports_the_anomaly_and_fails_the_run_when_it_cannot_roll_back(
    tmp_path: Path, config: AnomalySpec, reason: str
) -> None:
    sink = MemorySink()
    guard = AnomalyGuard(config, sink, tmp_path / "checkpoints")  # no checkpoint there
    state = LoopState(step=3)
    anomaly = guard.check_loss(state, 4, float("nan"))
    assert anomaly is not None

    def restore(path: Path) -> LoopState:
        raise AssertionError("nothing to restore")

    failure = guard.recover(state, anomaly, [6, 7], restore)
    assert failure == f"non_finite_loss at step 4 (loss nan); {reason}"
    assert sink.events_of("anomaly") == [{**anomaly, "micro_batches": [6, 7]}]
    assert sink.events_of("rollback") == [] and state.rollbacks == 0


def test_a_plateau_changes_lr_dropout_and_clip_once_patience_runs_out_then_early_stopping_ends_the_run() -> None:
    training = TrainingSpec(
        grad_clip=None,
        early_stopping_patience=3,
        plateau=PlateauSpec(patience=2, min_delta=0.1, dropout_to=0.3, clip_to=0.5, max_interventions=1),
    )
    sink, dropouts = MemorySink(), list[float]()
    watch = PlateauWatch(training, sink, lambda step: 0.01, dropouts.append)
    state = LoopState(loss_window=[2.0, 2.1, 1.9])
    for step, val_loss in enumerate((3.0, 2.95, 2.92), start=1):  # within min_delta of 3.0: the 2nd and 3rd wait
        state.step = step
        assert watch.observe(state, val_loss) is None
    (event,) = sink.events_of("intervention")
    assert event["step"] == 3 and event["changes"] == {
        "lr": {"before": 0.01, "after": pytest.approx(0.003)},
        "lr_scale": {"before": 1.0, "after": pytest.approx(0.3)},
        "dropout": {"before": 0.0, "after": 0.3},
        "grad_clip": {"before": None, "after": 0.5},
    }
    assert (state.lr_scale, state.dropout, state.grad_clip) == (pytest.approx(0.3), 0.3, 0.5)
    assert dropouts == [0.3] and state.best_val_loss == 2.92 and state.reference_val_loss == 3.0
    assert state.loss_window == []  # losses without dropout no longer tell what a spike is
    state.step = 4
    assert watch.observe(state, 2.91) == "val_loss did not improve by 0.1 for 3 evaluations"
    assert sink.events_of("early_stop")[0]["step"] == 4
    assert len(sink.events_of("intervention")) == 1  # max_interventions


def test_a_plateau_that_only_lowers_the_learning_rate_keeps_the_guards_window() -> None:
    training = TrainingSpec(plateau=PlateauSpec(patience=1, min_delta=0.1, raise_dropout=False))
    watch = PlateauWatch(training, MemorySink(), lambda step: 0.01, lambda p: None)
    state = LoopState(loss_window=[2.0, 2.1, 1.9])
    for step, val_loss in enumerate((3.0, 2.95), start=1):
        state.step = step
        watch.observe(state, val_loss)
    assert state.interventions == 1 and state.lr_scale < 1.0 and state.dropout == 0.0
    assert state.loss_window == [2.0, 2.1, 1.9]
