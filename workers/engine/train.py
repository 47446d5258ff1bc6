"""The training loop: one function, ``train(spec, data, out_dir, sink)``, readable top to bottom.

Per optimizer step: set the LR from the pure schedule ``lr_at(step, spec)`` (times the plateau scale; every
parameter group follows the same schedule from its own peak, see ``scheduled_lr``), run ``grad_accum_steps``
micro-batches under autocast, check the loss for anomalies, unscale/clip the global gradient norm, step the
optimizer (``workers.engine.optimizers``), update the aux-free router biases, log, evaluate every ``eval_interval``,
react to plateaus, and checkpoint every ``checkpoint_interval``. Anomalies (and rollbacks) and plateaus (and
early stopping) are judged by the loop's two collaborators in ``workers.engine.interventions``.

Run directory ``out_dir`` (its names are ``workers.engine.layout.RunLayout``'s)::

    spec.json           the spec of the latest start
    data/               the prepared data (when ``data`` is a source file)
    checkpoints/        step-000000/ (written at a fresh start: the first rollback target), then every
                        checkpoint_interval and at the end; the newest keep_checkpoints are kept

Metrics (``sink.emit(step, ...)``), every ``log_interval`` steps:

- ``loss``: the task loss of this step (mean over micro-batches; what ``val_loss`` compares with);
  ``aux_loss``: balance loss + router z-loss (``loss + aux_loss`` is what backward minimises, plus
  ``mtp_loss_weight × mtp_loss`` with multi-token prediction);
- ``mtp_loss`` (only with ``model.mtp_depth > 0``): the mean cross-entropy of the MTP modules, unweighted;
- ``lr``, ``grad_norm`` (global, before clipping), ``tokens_per_s``, ``step_time_s`` (means over the
  steps since the previous log, counting training steps only, not evaluations or checkpoints),
  ``memory_bytes`` (CUDA max allocated, or process RSS on CPU), ``dropped_fraction``,
  ``tokens_seen``, ``epoch`` (fractional);
- ``expert_load/L{block}/E{expert}``: fraction of the step's routed assignments processed by routed expert
  ``expert`` of transformer block ``block`` (absolute block index, dense blocks have none), after
  capacity dropping. A heatmap parses tags with ``^expert_load/L(\\d+)/E(\\d+)$``.

At each evaluation (every ``eval_interval`` steps and at the end): ``val_loss`` (token-weighted mean task
loss over up to ``eval_batches`` validation batches), ``val_ppl`` (causal_lm, ``exp(val_loss)``),
``val_accuracy`` (classification).

Events (``sink.event(kind, data)``, ``data["step"]`` always set): ``checkpoint``, ``resume``,
``intervention`` (``changes: {name: {before, after}}``), ``anomaly``, ``rollback``, ``early_stop``; with
``training.compile``: ``compiling`` before the first step of this start (which compiles the model) and ``compiled``
(``seconds``: that first step, compilation included) after it; the step-time metrics leave that step out.
After ``resume``/``rollback`` the steps after ``data["step"]`` are emitted again (see ``sinks``).

Determinism: with the same spec, data and device, a run resumed from a checkpoint takes exactly the steps
of an uninterrupted run (bitwise on CPU): the checkpoint holds parameters, optimizer, RNGs, data cursor
and every piece of loop state, including what interventions changed. On CUDA, kernels with atomic
accumulation make runs close but not bitwise equal.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import numpy as np
import psutil
import torch
from pydantic import ValidationError

from workers.engine.allocator import keep_freed_memory
from workers.engine.checkpoint import (
    LoadedCheckpoint,
    capture_rng_state,
    checkpoint_spec,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from workers.engine.data import (
    IGNORE_INDEX,
    Batch,
    Batches,
    PreparedData,
    eval_batches,
    preparation_settings,
    prepare,
)
from workers.engine.distributed import Parallel
from workers.engine.hf import load_hf_weights
from workers.engine.interventions import Anomaly, AnomalyGuard, PlateauWatch
from workers.engine.layout import RunLayout
from workers.engine.model import ModelOutput, MoETransformer, build_model, compile_for_training
from workers.engine.optimizers import as_torch_optimizer, build_optimizer, peak_learning_rates
from workers.engine.sinks import MetricsSink
from workers.engine.spec import Spec, load_spec

TrainStatus = Literal["completed", "early_stopped", "stopped", "preempted", "failed"]


class EngineConfigError(ValueError):
    """A spec, data or directory that cannot be trained as asked (raised before any step runs)."""


@dataclass
class TrainResult:
    """How ``train`` ended. ``step`` is the last completed optimizer step."""

    status: TrainStatus
    step: int
    best_val_loss: float | None
    checkpoint: Path | None
    reason: str


@dataclass
class FaultInjection:
    """Test hooks independent of the spec (the CLI's hidden ``--inject-faults``).

    The loss of each listed step is made NaN (or multiplied by ``spike_factor``) on the step's first
    attempt only, so a rollback's replay of that step proceeds normally. ``sleep_per_step_s`` slows every
    step (to land a signal mid-run).
    """

    nan_at_steps: frozenset[int] = frozenset()
    spike_at_steps: frozenset[int] = frozenset()
    spike_factor: float = 1000.0
    sleep_per_step_s: float = 0.0
    _fired: set[int] = field(default_factory=set, init=False, repr=False)

    def apply(self, step: int, loss: torch.Tensor, micro_batch: int) -> torch.Tensor:
        """The loss of micro-batch ``micro_batch`` (0-based within the step) of step ``step``."""
        if step in self._fired:
            return loss
        if micro_batch == 0 and step in self.nan_at_steps:
            return loss * float("nan")
        if micro_batch == 0 and step in self.spike_at_steps:
            return loss * self.spike_factor
        return loss

    def attempt_done(self, step: int) -> None:
        """Called after every attempt of a step, successful or not."""
        if step in self.nan_at_steps or step in self.spike_at_steps:
            self._fired.add(step)
        if self.sleep_per_step_s:
            time.sleep(self.sleep_per_step_s)


@dataclass
class LoopState:
    """Everything besides model/optimizer/RNG/data cursor that the next step depends on (JSON-able).

    Saved flat (``dataclasses.asdict``) as each checkpoint's loop state. The plateau fields are
    ``PlateauWatch``'s, the last three ``AnomalyGuard``'s (``workers.engine.interventions``).
    """

    step: int = 0  # completed optimizer steps
    tokens_seen: int = 0
    # PlateauWatch
    best_val_loss: float | None = None  # the lowest validation loss seen
    reference_val_loss: float | None = None  # the last *significant* improvement (by plateau.min_delta)
    evals_since_improvement: int = 0  # for early stopping
    plateau_wait: int = 0  # evaluations without improvement since the last intervention
    interventions: int = 0
    lr_scale: float = 1.0  # product of the plateau LR factors applied so far
    dropout: float = 0.0
    grad_clip: float | None = None
    # AnomalyGuard
    loss_window: list[float] = field(default_factory=list)  # recent accepted losses, oldest first
    rollbacks: int = 0
    skip_batches: list[int] = field(default_factory=list)  # micro-batch numbers never to train on

    @classmethod
    def initial(cls, spec: Spec) -> LoopState:
        return cls(dropout=spec.model.dropout, grad_clip=spec.training.grad_clip)


# --------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------


def scheduled_lr(step: int, peak: float, spec: Spec) -> float:
    """The learning rate of optimizer step ``step`` (1-based) for a parameter group whose peak is ``peak``.

    Linear warmup to the peak over ``warmup_steps`` (step ``warmup_steps`` is at the peak), then ``cosine`` or
    ``linear`` decay reaching ``peak * min_lr_ratio`` at ``max_steps``, ``constant``, or ``wsd``
    (warmup-stable-decay): the peak until the last ``decay_fraction`` of ``max_steps`` (never before warmup
    ends), then linear to the floor at ``max_steps``. Past ``max_steps`` the rate stays at the floor.
    """
    schedule = spec.training.schedule
    warmup = schedule.warmup_steps
    if step <= warmup:
        return peak * step / warmup
    if schedule.kind == "constant":
        return peak
    floor = peak * schedule.min_lr_ratio
    max_steps = spec.training.max_steps
    if schedule.kind == "wsd":
        decay_start = max(warmup, max_steps - math.ceil(schedule.decay_fraction * max_steps))
        if step <= decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return peak - (peak - floor) * progress
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule.kind == "cosine":
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)
    return peak - (peak - floor) * progress


def lr_at(step: int, spec: Spec) -> float:
    """Learning rate of optimizer step ``step`` (1-based, the number its metrics are logged under): the schedule
    of ``scheduled_lr`` from ``training.optimizer.lr`` (Muon's AdamW part follows it from ``adamw_lr``)."""
    return scheduled_lr(step, spec.training.optimizer.lr, spec)


def resolve_device(device: str | None) -> torch.device:
    """``device`` or, when None, CUDA if available else CPU. Refuses an unavailable CUDA clearly."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngineConfigError("device 'cuda' was requested but no CUDA device is available")
    if resolved.type not in ("cpu", "cuda"):
        raise EngineConfigError(f"unsupported device {device!r}: use cpu or cuda")
    return resolved


def autocast_context(spec: Spec, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of the autocast context for ``training.precision`` on ``device``."""
    precision = spec.training.precision
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        # CPU autocast has no loss scaler (GradScaler is CUDA-only here) and fp16 without scaling
        # underflows gradients: refuse rather than train badly.
        raise EngineConfigError("training.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EngineConfigError("this GPU does not support bf16; use fp16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on ``device``, or this process's resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(psutil.Process().memory_info().rss)


class _StopSignals:
    """Turns SIGTERM into a cooperative "preempt" request for the duration of training.

    Only the main thread may install signal handlers; elsewhere (a Celery thread pool) the caller's
    ``should_stop`` is the only way in. The previous handler is restored when training returns.
    """

    def __init__(self) -> None:
        self.preempt = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.preempt = True  # acted on between steps: the loop checkpoints and returns "preempted"

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


@torch.no_grad()
def validation_metrics(
    model: MoETransformer,
    prepared: PreparedData,
    spec: Spec,
    device: torch.device,
    *,
    max_batches: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    on_batch: Callable[[Batch, ModelOutput], None] | None = None,
) -> dict[str, float]:
    """``val_loss`` and ``val_ppl`` (causal_lm) or ``val_accuracy`` (classification) of ``model`` over the
    first ``max_batches`` validation batches of ``training.batch_size`` (``eval_batches``: the same examples
    every time, each at most once).

    ``val_loss`` is the token-weighted (causal_lm: predicted positions; classification: examples) mean task
    loss; ``val_ppl`` is ``exp(val_loss)`` (``inf`` when that overflows). The model runs in eval mode under
    ``autocast()``; its mode is restored afterwards. ``on_batch(batch, output)`` (the batch on the CPU as
    drawn, the output of the model) sees every batch: how ``evaluate.py`` collects predictions and routing
    over the very batches the trainer evaluates.
    """
    was_training = model.training
    model.eval()
    classification = spec.model.task == "classification"
    total, weight, correct, examples = 0.0, 0, 0, 0
    try:
        batches: Iterator[Batch] = eval_batches(
            prepared, "val", spec.training.batch_size, spec.data.seq_len, max_batches
        )
        for batch in batches:
            input_ids = batch.input_ids.to(device)
            labels = batch.labels.to(device)
            mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
            with autocast():
                # Only a classifier's logits are read (it always returns them): a language model's loss comes from
                # kernels.head_loss, a chunk of rows at a time, without the (B, T, V) logits.
                out = model(input_ids, labels=labels, attention_mask=mask, return_logits=False)
            assert out.task_loss is not None
            if classification:
                n = int(labels.numel())
                correct += int((out.logits.argmax(dim=-1) == labels).sum())
                examples += n
            else:
                n = int((labels[:, 1:] != IGNORE_INDEX).sum())  # predicted positions (the model shifts)
            total += float(out.task_loss.float()) * n
            weight += n
            if on_batch is not None:
                on_batch(batch, out)
    finally:
        model.train(was_training)
    val_loss = total / max(weight, 1)
    metrics = {"val_loss": val_loss}
    if classification:
        metrics["val_accuracy"] = correct / max(examples, 1)
    else:
        metrics["val_ppl"] = math.exp(val_loss) if val_loss < 700 else math.inf
    return metrics


# --------------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------------


def train(
    spec: Spec,
    data: PreparedData | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    sink: MetricsSink,
    *,
    resume: bool = True,
    should_stop: Callable[[], bool] | None = None,
    device: str | None = None,
    stop_after_step: int | None = None,
    faults: FaultInjection | None = None,
    init_from: str | os.PathLike[str] | None = None,
    parallel: Parallel | None = None,
) -> TrainResult:
    """Train ``spec`` on ``data`` (a prepared dataset or a source file to prepare) into ``out_dir``.

    - ``resume``: continue from the newest valid checkpoint in ``out_dir/checkpoints`` if there is one.
      With ``resume=False`` a directory that already holds checkpoints is refused (``EngineConfigError``)
      rather than silently overwritten.
    - ``should_stop``: polled before every step; when it returns True the loop checkpoints and returns
      ``"stopped"``. SIGTERM (when called from the main thread) does the same and returns ``"preempted"``.
    - ``stop_after_step``: checkpoint and return ``"stopped"`` once this step is done; the LR schedule still
      follows ``training.max_steps`` (how a run is split into resumable pieces).
    - ``faults``: test-only fault injection.
    - ``parallel``: this process's place in a multi-device run (``workers.engine.distributed``, which starts such
      runs); None: one process. Only rank 0 writes files and sends to ``sink``.
    - ``init_from``: a Hugging Face folder (``workers.engine.hf``) whose weights the model starts from instead of
      a random initialisation; read only when the run has no checkpoint yet (a resumed run continues from its own).

    Returns ``"completed"`` (reached ``max_steps``), ``"early_stopped"``, ``"stopped"``, ``"preempted"``
    or ``"failed"`` (an anomaly with action ``stop``, or rollbacks exhausted). Raises ``EngineConfigError``
    for a configuration that cannot run, ``DataFormatError`` for bad data. The caller owns ``sink``.
    """
    run = RunLayout.at(out_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    autocast = autocast_context(spec, dev)
    # Freed memory stays in the process for the run: each step re-allocates the same large buffers, and
    # glibc would otherwise unmap and fault them in again every step (see workers.engine.allocator).
    with _StopSignals() as signals, keep_freed_memory():
        tokenizer_file = initial_tokenizer(init_from)
        if isinstance(data, PreparedData):
            prepared = data
        else:
            prepared = prepare(spec, data, run.prepared_data, tokenizer_file=tokenizer_file)
        _check_data_fits(spec, prepared, tokenizer_file)
        parallel = parallel or Parallel.single()
        if parallel.distributed and init_from is not None:
            raise EngineConfigError("starting from a Hugging Face folder is not offered on several devices yet")
        if parallel.is_main:
            run.spec.write_text(spec.model_dump_json(indent=2))
        trainer = _Trainer(spec, prepared, run, sink, dev, autocast, faults or FaultInjection(), parallel)
        trainer.start(resume, init_from)
        return trainer.run(lambda: signals.preempt, should_stop, stop_after_step)


def initial_tokenizer(init_from: str | os.PathLike[str] | None) -> Path | None:
    """The ``tokenizer.json`` of the folder a run starts from, if it has one: the run tokenizes its data with it."""
    if init_from is None:
        return None
    path = Path(init_from) / "tokenizer.json"
    return path if path.is_file() else None


def _check_data_fits(spec: Spec, prepared: PreparedData, tokenizer_file: Path | None = None) -> None:
    """A preparation handed in by the caller must be the one ``prepare(spec, ...)`` would have made (with the
    tokenizer of the folder the run starts from, when it has one)."""
    expected = preparation_settings(spec, prepared.meta["format"])
    if tokenizer_file is not None:
        expected["tokenizer_file_sha256"] = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    differing = sorted(k for k in expected if prepared.meta["settings"].get(k) != expected[k])
    if differing:
        names = ", ".join(differing)
        raise EngineConfigError(f"the data was prepared with other settings ({names}) than the spec's")
    if prepared.vocab_size > spec.model.vocab_size:
        raise EngineConfigError(
            f"the tokenizer has {prepared.vocab_size} ids, more than model.vocab_size {spec.model.vocab_size}"
        )
    labels = prepared.labels
    if labels is not None and len(labels) > (spec.model.num_labels or 0):
        raise EngineConfigError(f"the data has {len(labels)} labels, model.num_labels is {spec.model.num_labels}")


@dataclass
class _StepOutcome:
    step: int  # the step attempted
    loss: float  # total loss (task + aux), the anomaly detector's input
    task_loss: float
    aux_loss: float
    grad_norm: float
    dropped_fraction: float
    mtp_loss: float | None  # None without multi-token prediction
    expert_load: list[list[float]]  # (num_moe_layers, E)
    micro_batches: list[int]  # the micro-batch numbers this step trained on
    anomaly: Anomaly | None = None  # why the step was refused (not applied), if it was


class _Trainer:
    """The state of one run; ``run`` is the loop."""

    def __init__(
        self,
        spec: Spec,
        prepared: PreparedData,
        run: RunLayout,
        sink: MetricsSink,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
        faults: FaultInjection,
        parallel: Parallel | None = None,
    ) -> None:
        t = spec.training
        self.parallel = parallel = parallel or Parallel.single()
        self.spec = spec
        self.prepared = prepared
        self.sink = sink
        self.device = device
        self.autocast = autocast
        self.faults = faults
        self.ckpt_root = run.checkpoints
        self.classification = spec.model.task == "classification"
        seed_everything(t.seed)
        self.model = build_model(spec).to(device)
        self.model.gradient_checkpointing = t.gradient_checkpointing
        self.model.train()
        # What the step calls (a DDP wrapper, or the model itself); self.model stays the handle for its methods.
        self.step_model = parallel.wrap(self.model, device)
        # Compiled for the training forward only (evaluation and checkpoints use the eager self.model, which
        # shares its parameters). Single-process runs: the distributed wrappers stay eager.
        self.compile_pending = t.compile and not parallel.distributed
        if self.compile_pending:
            self.step_model = compile_for_training(self.model)
        self.optimizer = build_optimizer(self.model, spec, device)
        self.peak_lrs = peak_learning_rates(self.optimizer)  # before a checkpoint's groups replace them
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.batches = Batches(prepared, "train", t.batch_size, spec.data.seq_len, t.seed)
        self.state = LoopState.initial(spec)
        self.last_checkpoint: Path | None = None
        self.last_checkpoint_step = -1
        self.guard = AnomalyGuard(t.anomaly, sink, self.ckpt_root)
        self.plateau = PlateauWatch(t, sink, lambda step: lr_at(step, spec), self.model.set_dropout)
        first_moe = spec.model.moe.first_dense_layers
        E = spec.model.moe.num_routed_experts
        self.load_keys = [
            [f"expert_load/L{first_moe + i}/E{e}" for e in range(E)] for i in range(spec.model.num_moe_layers)
        ]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    # -- start: fresh or resumed ---------------------------------------------------------------------------

    def start(self, resume: bool, init_from: str | os.PathLike[str] | None = None) -> None:
        # Rank 0 decides which checkpoint every rank starts from (the others would race its writes otherwise).
        latest = self.parallel.broadcast(latest_checkpoint(self.ckpt_root) if self.parallel.is_main else None)
        if latest is None:
            if init_from is not None:
                fresh = load_hf_weights(self.model, init_from)  # before step 0: its checkpoint holds these weights
                self.sink.event("initialised", {"from": Path(init_from).name, "fresh_parameters": len(fresh)})
            # The step-0 checkpoint makes "roll back to the last checkpoint" always possible.
            self._save()
            return
        if not resume:
            raise EngineConfigError(
                f"{self.ckpt_root} already holds checkpoints: resume the run, or train into a new directory"
            )
        loaded = self._restore(latest)
        self.last_checkpoint, self.last_checkpoint_step = latest, loaded.step
        self.sink.event("resume", {"step": loaded.step, "checkpoint": str(latest)})

    def _roll_back_to(self, path: Path) -> LoopState:
        """Bring the run back to checkpoint ``path`` (``AnomalyGuard.recover``'s ``restore``)."""
        # Reset the router-load accumulators filled by the failed step (the bias change this would make
        # is overwritten by the checkpoint's biases just below).
        self.model.update_router_biases()
        loaded = self._restore(path)
        self.last_checkpoint, self.last_checkpoint_step = path, loaded.step
        return self.state

    def _restore(self, path: Path) -> LoadedCheckpoint:
        # A previous run may have saved a different architecture or data settings; its weights, cursor
        # and token ids would then be meaningless here. Training settings may change (e.g. max_steps).
        # Compared as validated specs: fields added to the schema since the checkpoint was written take their
        # defaults, which keep the behaviour the run had.
        try:
            saved = load_spec(checkpoint_spec(path))
        except ValidationError as exc:
            raise EngineConfigError(f"checkpoint {path.name} holds a spec that no longer validates: {exc}") from None
        for section in ("model", "data"):
            if getattr(saved, section) != getattr(self.spec, section):
                raise EngineConfigError(
                    f"checkpoint {path.name} was trained with a different '{section}' section; "
                    "train into a new directory"
                )
        p = self.parallel
        if p.sharded_optimizer:
            # The whole model is one file; each rank takes its part of it, and its own optimizer shards.
            shadow = p.shadow(self.spec)
            loaded = load_checkpoint(path, model=shadow, rank=p.rank)
            p.load_full_model_state(self.model, shadow.state_dict())
            p.read_optimizer(self.model, self.optimizer, path)
        else:
            loaded = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scaler=self.scaler, rank=p.rank)
        self.state = LoopState(**loaded.loop_state)
        self.batches.load_state_dict(loaded.data_state)
        self.model.set_dropout(self.state.dropout)  # an intervention may have raised it
        return loaded

    # -- the loop ------------------------------------------------------------------------------------------

    def run(
        self,
        preempted: Callable[[], bool],
        should_stop: Callable[[], bool] | None,
        stop_after_step: int | None,
    ) -> TrainResult:
        t = self.spec.training
        st = self.state
        steps_since_log, seconds_since_log = 0, 0.0  # step time only: evaluations and checkpoints excluded
        while True:
            # Stop requests are honoured between steps: the state is consistent there, so the
            # checkpoint taken on the way out resumes exactly.
            preempt, stop = preempted(), should_stop is not None and should_stop()
            if self.parallel.distributed:
                # Every rank stops at the same step: the final checkpoint is written by all of them together.
                asked_stop, asked_preempt = self.parallel.stop_requested()
                preempt, stop = self.parallel.agree(preempt or asked_preempt, stop or asked_stop)
            if preempt:
                return self._finish("preempted", "SIGTERM received")
            if stop:
                return self._finish("stopped", "stop requested")
            if st.step >= t.max_steps:
                return self._finish("completed", f"reached max_steps {t.max_steps}")
            if stop_after_step is not None and st.step >= stop_after_step:
                return self._finish("stopped", f"reached stop_after_step {stop_after_step}")

            compiling = self.compile_pending
            if compiling:
                self.sink.event("compiling", {"step": st.step})
            began = time.perf_counter()
            outcome = self._train_step()  # ends with .item() calls, so on CUDA the time is the real one
            elapsed = time.perf_counter() - began
            if compiling:
                # A phase of its own (the dashboard shows it), not a training step's time.
                self.compile_pending = False
                self.sink.event("compiled", {"step": st.step, "seconds": round(elapsed, 3)})
            self.faults.attempt_done(outcome.step)
            if outcome.anomaly is not None:
                failure = self.guard.recover(st, outcome.anomaly, outcome.micro_batches, self._roll_back_to)
                if failure is not None:
                    return self._result("failed", failure)
                st = self.state  # the rollback replaced the loop state
                steps_since_log, seconds_since_log = 0, 0.0
                continue
            if not compiling:
                steps_since_log, seconds_since_log = steps_since_log + 1, seconds_since_log + elapsed

            if st.step % t.log_interval == 0 or st.step == t.max_steps:
                # None: only the compiling step since the last log, no step time to report.
                self._log(outcome, seconds_since_log / steps_since_log if steps_since_log else None)
                steps_since_log, seconds_since_log = 0, 0.0
            if st.step % t.eval_interval == 0 or st.step == t.max_steps:
                early_stop = self._evaluate_and_react()
                if early_stop:
                    return self._finish("early_stopped", early_stop)
            if st.step % t.checkpoint_interval == 0:
                self._save()

    def _next_batch(self) -> tuple[int, Batch]:
        """The next micro-batch not on the skip list (batches that caused an anomaly), with its number."""
        skip = self.state.skip_batches
        while True:
            number = self.batches.batches_drawn
            batch = next(self.batches)
            if number not in skip:
                return number, batch

    def _train_step(self) -> _StepOutcome:
        t = self.spec.training
        step = self.state.step + 1
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs, strict=True):
            group["lr"] = scheduled_lr(step, peak, self.spec) * self.state.lr_scale

        accum = t.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        task_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        dropped_sum = torch.zeros((), device=self.device)
        mtp_sum = torch.zeros((), device=self.device)
        load_sum: torch.Tensor | None = None
        numbers = []
        for micro in range(accum):
            number, batch = self._next_batch()
            batch = self.parallel.shard(batch)  # this rank's rows of the global micro-batch
            numbers.append(number)
            input_ids = batch.input_ids.to(self.device, non_blocking=True)  # (B, T)
            labels = batch.labels.to(self.device, non_blocking=True)  # (B, T) or (B,)
            mask = None if batch.attention_mask is None else batch.attention_mask.to(self.device)
            with self.parallel.no_sync(self.step_model, micro == accum - 1):
                with self.autocast():
                    out = self.step_model(input_ids, labels=labels, attention_mask=mask, return_logits=False)
                assert out.loss is not None and out.task_loss is not None  # labels were given
                loss = self.faults.apply(step, out.loss, micro)
                scaled = loss / accum
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            loss_sum += loss.detach().float()
            task_sum += out.task_loss.detach().float()
            aux_sum += out.aux_loss.detach().float()
            dropped_sum += out.dropped_fraction.detach().float()
            if out.mtp_loss is not None:
                mtp_sum += out.mtp_loss.detach().float()
            load = out.expert_load.detach().float()
            load_sum = load if load_sum is None else load_sum + load

        if self.parallel.distributed:
            # The step's figures over the global batch: the mean of the ranks' (equal-sized) shares, one all-reduce.
            sums = [loss_sum, task_sum, aux_sum, dropped_sum, mtp_sum]
            loads = torch.zeros(0, device=self.device) if load_sum is None else load_sum.reshape(-1)
            flat = self.parallel.mean(torch.cat([torch.stack(sums), loads]))
            loss_sum, task_sum, aux_sum, dropped_sum, mtp_sum = flat[:5]
            load_sum = None if load_sum is None else flat[5:].view_as(load_sum)
        loss_value = loss_sum.item() / accum
        outcome = _StepOutcome(
            step=step,
            loss=loss_value,
            task_loss=task_sum.item() / accum,
            aux_loss=aux_sum.item() / accum,
            grad_norm=float("nan"),
            dropped_fraction=dropped_sum.item() / accum,
            mtp_loss=mtp_sum.item() / accum if self.spec.model.mtp_depth else None,
            expert_load=[] if load_sum is None else (load_sum / accum).tolist(),
            micro_batches=numbers,
        )
        # Checked before the optimizer step: a bad loss must not reach the weights.
        outcome.anomaly = self.guard.check_loss(self.state, step, loss_value)
        if outcome.anomaly is not None:
            self.optimizer.zero_grad(set_to_none=True)
            return outcome

        if self.scaler is not None:
            self.scaler.unscale_(as_torch_optimizer(self.optimizer))  # clip and report the true gradient norm
        clip = self.state.grad_clip
        # max_norm=inf measures without clipping (the scale factor is clamped to exactly 1).
        outcome.grad_norm = self.parallel.clip_grad_norm(self.model, clip if clip is not None else math.inf)
        if self.scaler is None:  # with fp16 the scaler owns non-finite gradients (it skips the step)
            outcome.anomaly = self.guard.check_grad_norm(self.state, step, loss_value, outcome.grad_norm)
            if outcome.anomaly is not None:
                self.optimizer.zero_grad(set_to_none=True)
                return outcome
        if self.scaler is not None:
            self.scaler.step(as_torch_optimizer(self.optimizer))
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.parallel.reduce_router_loads(self.model)  # every rank applies the same loads: the biases stay equal
        self.model.update_router_biases()

        st = self.state
        st.step = step
        st.tokens_seen += accum * t.batch_size * self.spec.data.seq_len
        self.guard.accept(st, loss_value)
        return outcome

    # -- logging and evaluation ----------------------------------------------------------------------------

    def _log(self, outcome: _StepOutcome, step_time: float | None) -> None:
        """Emit the step's metrics; ``step_time`` None (the compiling step alone) leaves out the throughput."""
        t = self.spec.training
        tokens_per_step = t.grad_accum_steps * t.batch_size * self.spec.data.seq_len
        metrics: dict[str, float] = {
            "loss": outcome.task_loss,
            "aux_loss": outcome.aux_loss,
            "lr": lr_at(self.state.step, self.spec) * self.state.lr_scale,
            "grad_norm": outcome.grad_norm,
            "memory_bytes": float(memory_bytes(self.device)),
            "dropped_fraction": outcome.dropped_fraction,
            "tokens_seen": float(self.state.tokens_seen),
            "epoch": self.batches.epoch_progress,
        }
        if step_time is not None:
            metrics["tokens_per_s"] = tokens_per_step / step_time if step_time > 0 else 0.0
            metrics["step_time_s"] = step_time
        if outcome.mtp_loss is not None:
            metrics["mtp_loss"] = outcome.mtp_loss
        for keys, row in zip(self.load_keys, outcome.expert_load, strict=True):
            metrics.update(zip(keys, row, strict=True))
        self.sink.emit(self.state.step, metrics)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics over up to ``eval_batches`` batches (the same ones every time)."""
        t = self.spec.training
        return validation_metrics(
            self.model, self.prepared, self.spec, self.device, max_batches=t.eval_batches, autocast=self.autocast
        )

    def _evaluate_and_react(self) -> str | None:
        """Evaluate, emit, and let the plateau watch react; returns the early-stop reason, if any."""
        metrics = self.evaluate()
        self.sink.emit(self.state.step, metrics)
        return self.plateau.observe(self.state, metrics["val_loss"])

    # -- checkpoints and the way out -----------------------------------------------------------------------

    def _save(self) -> Path:
        st = self.state
        began = time.perf_counter()
        # Write-ahead (``workers.engine.sinks``): the record holds every step up to this one before the checkpoint
        # exists, since a run resumed from it never emits those steps again.
        self.sink.flush()
        if self.parallel.distributed:
            path = self._save_distributed()
        else:
            path = save_checkpoint(
                self.ckpt_root,
                st.step,
                model=self.model,
                optimizer=self.optimizer,
                spec=self.spec,
                loop_state=asdict(st),
                data_state=self.batches.state_dict(),
                scaler=self.scaler,
                keep=self.spec.training.keep_checkpoints,
            )
        self.last_checkpoint, self.last_checkpoint_step = path, st.step
        self.sink.event("checkpoint", {"step": st.step, "path": str(path), "seconds": time.perf_counter() - began})
        return path

    def _save_distributed(self) -> Path:
        """Every rank takes part (collectives); rank 0 commits the checkpoint; every rank returns its path."""
        p, st = self.parallel, self.state
        rngs = p.gather(capture_rng_state())
        sharded = p.sharded_optimizer
        full = p.full_model_state(self.model) if sharded else None
        if not p.is_main:
            if sharded:  # rank 0 names the scratch folder the shards go to
                p.write_optimizer(self.model, self.optimizer, Path(p.broadcast(None)))
            return Path(p.broadcast(None))
        model: torch.nn.Module = self.model
        if full is not None:
            model = p.shadow(self.spec)
            model.load_state_dict(full)

        def write_shards(scratch: Path) -> None:
            p.broadcast(str(scratch))
            p.write_optimizer(self.model, self.optimizer, scratch)

        assert rngs is not None
        path = save_checkpoint(
            self.ckpt_root,
            st.step,
            model=model,
            optimizer=None if sharded else self.optimizer,
            spec=self.spec,
            loop_state=asdict(st),
            data_state=self.batches.state_dict(),
            scaler=self.scaler,
            keep=self.spec.training.keep_checkpoints,
            rng_state={**rngs[0], "ranks": rngs},
            write_extra=write_shards if sharded else None,
        )
        return Path(p.broadcast(str(path)))  # also the barrier: no rank reads checkpoints before the commit

    def _finish(self, status: TrainStatus, reason: str) -> TrainResult:
        if self.last_checkpoint_step != self.state.step:
            self._save()
        return self._result(status, reason)

    def _result(self, status: TrainStatus, reason: str) -> TrainResult:
        return TrainResult(
            status=status,
            step=self.state.step,
            best_val_loss=self.state.best_val_loss,
            checkpoint=self.last_checkpoint,
            reason=reason,
        )
