"""What the training loop hands a step's loss and an evaluation's result to: its two watchers.

- ``AnomalyGuard`` judges every step before the optimizer applies it (a non-finite loss, a loss spike against
  the window of recent losses, a non-finite gradient norm). For a step it refuses, it reports the ``anomaly``
  event and either rolls the run back to its newest checkpoint, never to train on the step's micro-batches
  again (``rollback`` event), or says why the run fails.
- ``PlateauWatch`` follows validation loss: the best value, the last significant improvement, the plateau
  interventions (lower the learning rate, raise dropout, tighten clipping: ``intervention`` event) and early
  stopping (``early_stop`` event).

Neither keeps state of its own between calls: what they remember lives in the loop's state (the fields named
by ``AnomalyState`` and ``PlateauState``, both satisfied by ``workers.engine.train.LoopState``), which every
checkpoint carries. So a resumed run continues with the same windows, counters and applied interventions, and a
rollback restores them with the weights, as if the refused steps had never happened.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from workers.engine.checkpoint import latest_checkpoint
from workers.engine.sinks import MetricsSink
from workers.engine.spec import AnomalySpec, TrainingSpec

# Share of |mean| below which the window's standard deviation is not trusted for spike detection: a
# nearly flat window would otherwise turn ordinary batch-to-batch noise into "anomalies".
_MIN_RELATIVE_STD = 0.01

# The data of an ``anomaly`` event: ``step``, ``kind`` (non_finite_loss, loss_spike, non_finite_grad_norm),
# ``loss``, ``action`` (rollback or stop), and the kind's own figures.
Anomaly = dict[str, Any]


class AnomalyState(Protocol):
    """The loop state ``AnomalyGuard`` reads and writes."""

    step: int  # completed optimizer steps
    loss_window: list[float]  # recent accepted losses, oldest first
    rollbacks: int
    skip_batches: list[int]  # micro-batch numbers never to train on


class PlateauState(Protocol):
    """The loop state ``PlateauWatch`` reads and writes (the loop applies ``lr_scale`` and ``grad_clip``)."""

    step: int
    loss_window: list[float]  # ``AnomalyGuard``'s window: emptied when an intervention raises dropout
    best_val_loss: float | None
    reference_val_loss: float | None
    evals_since_improvement: int
    plateau_wait: int
    interventions: int
    lr_scale: float
    dropout: float
    grad_clip: float | None


class AnomalyGuard:
    """Refuses steps whose loss or gradient is anomalous, and recovers from them (``training.anomaly``)."""

    def __init__(self, config: AnomalySpec, sink: MetricsSink, checkpoints: Path) -> None:
        self.config = config
        self.sink = sink
        self.checkpoints = checkpoints  # where the rollback target is looked for

    def check_loss(self, state: AnomalyState, step: int, loss: float) -> Anomaly | None:
        """The anomaly of step ``step``'s loss (before the optimizer step), or None when it may proceed."""
        a = self.config
        if not a.enabled:
            return None
        if not math.isfinite(loss):
            return self._record(state, step, "non_finite_loss", loss)
        window = state.loss_window
        if len(window) < a.window:
            return None  # too little history to call anything a spike
        mean, std = float(np.mean(window)), float(np.std(window))
        limit = mean + a.threshold * max(std, _MIN_RELATIVE_STD * abs(mean))
        if loss > limit:
            return self._record(state, step, "loss_spike", loss, window_mean=mean, window_std=std, limit=limit)
        return None

    def check_grad_norm(self, state: AnomalyState, step: int, loss: float, grad_norm: float) -> Anomaly | None:
        """The anomaly of a non-finite gradient norm, or None. (Not for fp16 runs: there the loss scaler owns
        non-finite gradients, skipping the step and lowering the scale.)"""
        if self.config.enabled and not math.isfinite(grad_norm):
            return self._record(state, step, "non_finite_grad_norm", loss)
        return None

    def accept(self, state: AnomalyState, loss: float) -> None:
        """Add an applied step's loss to the window the next steps are judged against."""
        state.loss_window = [*state.loss_window, loss][-self.config.window :]

    def recover(
        self,
        state: AnomalyState,
        anomaly: Anomaly,
        micro_batches: list[int],
        restore: Callable[[Path], AnomalyState],
    ) -> str | None:
        """Report ``anomaly`` (of a step trained on ``micro_batches``), then roll back or give up.

        Rolling back calls ``restore(checkpoint)`` with the newest valid checkpoint; it must bring the whole
        run back to that checkpoint and return the restored loop state, which then also counts this rollback
        and skips ``micro_batches`` from now on. Returns None after a rollback, or the reason the run fails
        (``action`` stop, rollbacks exhausted, or no checkpoint). Nothing is saved on the way out: the model may
        already be damaged, so the last good checkpoint stays the newest.
        """
        anomaly = {**anomaly, "micro_batches": micro_batches}
        self.sink.event("anomaly", anomaly)
        description = f"{anomaly['kind']} at step {anomaly['step']} (loss {anomaly['loss']})"
        if anomaly["action"] == "stop":
            a = self.config
            why = "anomaly.action is stop" if a.action == "stop" else f"max_rollbacks ({a.max_rollbacks}) reached"
            return f"{description}; {why}"
        target = latest_checkpoint(self.checkpoints)
        if target is None:
            return f"{description}; no valid checkpoint to roll back to"
        # What survives the restore: how many rollbacks happened, and which batches must never be used again.
        rollbacks = state.rollbacks + 1
        skip = sorted({*state.skip_batches, *micro_batches})
        restored = restore(target)
        restored.rollbacks, restored.skip_batches = rollbacks, skip
        self.sink.event(
            "rollback",
            {
                "step": restored.step,
                "from_step": anomaly["step"],
                "checkpoint": str(target),
                "skipped_micro_batches": micro_batches,
                "rollbacks": rollbacks,
            },
        )
        return None

    def _record(self, state: AnomalyState, step: int, kind: str, loss: float, **extra: Any) -> Anomaly:
        a = self.config
        can_roll_back = a.action == "rollback" and state.rollbacks < a.max_rollbacks
        return {
            "step": step,
            "kind": kind,
            "loss": loss,
            "action": "rollback" if can_roll_back else "stop",
            **extra,
        }


class PlateauWatch:
    """Reacts to validation loss: plateau interventions (``training.plateau``) and early stopping
    (``training.early_stopping_patience``).

    ``schedule(step)`` is the learning rate the schedule gives a step before the plateau scale (reported by an
    intervention); ``set_dropout(p)`` applies a raised dropout to the model.
    """

    def __init__(
        self,
        training: TrainingSpec,
        sink: MetricsSink,
        schedule: Callable[[int], float],
        set_dropout: Callable[[float], None],
    ) -> None:
        self.training = training
        self.sink = sink
        self.schedule = schedule
        self.set_dropout = set_dropout

    def observe(self, state: PlateauState, val_loss: float) -> str | None:
        """Take the validation loss measured after step ``state.step``: update the best value and the plateau
        counters, intervene on a plateau, and return the reason to stop early, if the patience has run out."""
        st, p = state, self.training.plateau
        if st.best_val_loss is None or val_loss < st.best_val_loss:
            st.best_val_loss = val_loss
        # Keras semantics: only a drop of more than min_delta below the reference counts, and only such a
        # drop moves the reference, so a slow but steady improvement still registers over several evals.
        if st.reference_val_loss is None or val_loss < st.reference_val_loss - p.min_delta:
            st.reference_val_loss = val_loss
            st.evals_since_improvement = 0
            st.plateau_wait = 0
        else:
            st.evals_since_improvement += 1
            st.plateau_wait += 1
            if p.enabled and st.plateau_wait >= p.patience and st.interventions < p.max_interventions:
                self._intervene(st, val_loss)
        patience = self.training.early_stopping_patience
        if patience is not None and st.evals_since_improvement >= patience:
            reason = f"val_loss did not improve by {p.min_delta} for {patience} evaluations"
            self.sink.event(
                "early_stop",
                {"step": st.step, "best_val_loss": st.best_val_loss, "patience": patience, "reason": reason},
            )
            return reason
        return None

    def _intervene(self, st: PlateauState, val_loss: float) -> None:
        """Apply the enabled plateau interventions that change something, and report them."""
        p = self.training.plateau
        changes: dict[str, dict[str, float | None]] = {}
        if p.reduce_lr:
            before = self.schedule(st.step) * st.lr_scale
            st.lr_scale *= p.lr_factor
            changes["lr"] = {"before": before, "after": self.schedule(st.step) * st.lr_scale}
            changes["lr_scale"] = {"before": st.lr_scale / p.lr_factor, "after": st.lr_scale}
        if p.raise_dropout and st.dropout < p.dropout_to:
            changes["dropout"] = {"before": st.dropout, "after": p.dropout_to}
            st.dropout = p.dropout_to
            self.set_dropout(st.dropout)
            # Dropout raises the training loss at once (a model that had learnt its corpus by heart: 2.1 -> 4.5
            # in the tiny demo, bench.learning at 300 s). Judged against the window of losses without dropout,
            # every following step was a "spike": the guard rolled back to the checkpoint that already had the
            # new dropout, three times, and failed the run. The guard waits for a full window of new losses.
            st.loss_window = []
        if p.tighten_clip and (st.grad_clip is None or st.grad_clip > p.clip_to):
            changes["grad_clip"] = {"before": st.grad_clip, "after": p.clip_to}
            st.grad_clip = p.clip_to
        st.plateau_wait = 0  # give the change `patience` evaluations to work before the next one
        if not changes:
            return  # everything enabled is already at its target: nothing happened, nothing to report
        st.interventions += 1
        self.sink.event(
            "intervention",
            {
                "step": st.step,
                "reason": f"val_loss did not improve by {p.min_delta} for {p.patience} evaluations",
                "val_loss": val_loss,
                "best_val_loss": st.best_val_loss,
                "intervention": st.interventions,
                "changes": changes,
            },
        )
