"""A short, timed training run of a spec on this device: the measurement that calibrates the estimator.

``measure_training(spec, steps=..., warmup=...)`` builds the model, trains it for ``warmup + steps`` optimizer
steps on random token batches of the spec's shape and returns the median step time (and the peak resident
memory of this process on CPU, or the peak allocated memory on CUDA). Random tokens are enough: a step's cost
depends on shapes, not on what the tokens mean, and a freshly initialised router spreads them evenly.

The loop is the training loop's own step (``workers.engine.train``: its optimizer and autocast), without
data loading, logging, evaluation or checkpoints: AdamW (fused where available) with weight decay on matrices,
autocast for bf16/fp16 with fp32 master weights, loss divided by the accumulation steps, global-norm clipping,
gradients set to None after the step, the aux-free router bias update. That is the contract the estimator
models (``workers.engine.estimate``).

``python -m workers.engine.calibrate spec.json [--steps N] [--warmup N] [--device cpu|cuda]`` prints the
measurement as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from workers.engine.allocator import keep_freed_memory
from workers.engine.hardware import profile_for_device
from workers.engine.model import build_model
from workers.engine.optimizers import as_torch_optimizer, build_optimizer
from workers.engine.spec import Spec, load_spec
from workers.engine.train import autocast_context


@dataclass(frozen=True)
class Measurement:
    """What a timed run measured. ``peak_bytes`` is the peak memory the training added: on CPU the growth of
    the process's peak resident set over its size before the model was built, on CUDA
    ``torch.cuda.max_memory_allocated``. ``process_peak_bytes`` is the whole footprint the estimator's peak
    predicts: on CPU the process's peak resident set, on CUDA the caching allocator's peak reservation."""

    device: str
    device_name: str
    hardware: str | None  # the matching profile key, None for an unknown GPU
    precision: str
    steps: int
    step_seconds: float  # median over the timed steps
    min_step_seconds: float  # the fastest: the least disturbed by other processes on a shared machine
    step_times: list[float]
    tokens_per_step: int
    peak_bytes: int
    process_peak_bytes: int
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rss_peak_bytes() -> int:
    """This process's peak resident set size, from its own start.

    On Linux, VmHWM of /proc/self/status: ru_maxrss survives execve, so a process started by a large parent
    (fork, then exec) would report the parent's size at the fork (seen: an 830 MiB pytest process made a
    660 MiB run read 826 MiB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class TrainingSteps:
    """A model with its optimizer that runs timed optimizer steps of ``spec`` on random batches.

    Separate from ``measure_training`` so that two specs can be timed in alternation (one step each, in
    turn): on a shared machine that exposes both to the same interference.
    """

    def __init__(self, spec: Spec, device: torch.device, seed: int = 0) -> None:
        self.spec = spec
        self.device = device
        torch.manual_seed(seed)
        self.model = build_model(spec).to(device)
        self.model.train()
        self.optimizer = build_optimizer(self.model, spec, device)
        self.autocast = autocast_context(spec, device)
        self.scaler = torch.amp.GradScaler("cuda") if spec.training.precision == "fp16" else None
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        m, dev = self.spec.model, self.device
        B, T = self.spec.training.batch_size, self.spec.data.seq_len
        ids = torch.randint(0, m.vocab_size, (B, T), generator=self.generator).to(dev)
        if m.task == "classification":
            assert m.num_labels is not None
            labels = torch.randint(0, m.num_labels, (B,), generator=self.generator).to(dev)
            return ids, labels, torch.ones(B, T, dtype=torch.long, device=dev)
        return ids, ids, None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> float:
        """One optimizer step (all micro-batches); returns its wall-clock seconds."""
        t = self.spec.training
        self._sync()
        start = time.perf_counter()
        for _ in range(t.grad_accum_steps):
            ids, labels, mask = self._batch()
            with self.autocast():
                # The output is held through backward, as a training loop that reads its metrics does; no logits,
                # as the training step asks (``return_logits=False``).
                out = self.model(ids, labels=labels, attention_mask=mask, return_logits=False)
            assert out.loss is not None
            loss = out.loss / t.grad_accum_steps
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            del out, loss
        if self.scaler:
            self.scaler.unscale_(as_torch_optimizer(self.optimizer))
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        if self.scaler:
            self.scaler.step(as_torch_optimizer(self.optimizer))
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_router_biases()
        self._sync()
        return time.perf_counter() - start


def measure_training(
    spec: Spec,
    *,
    steps: int = 5,
    warmup: int = 2,
    device: str | None = None,
    seed: int = 0,
) -> Measurement:
    """Train ``spec`` for ``warmup + steps`` optimizer steps on random batches and time the last ``steps``.

    ``device`` defaults to CUDA when present. Raises ``EngineConfigError`` (a ``ValueError``) for a precision
    the device cannot run.
    """
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be ≥ 1 and warmup ≥ 0")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _current_rss_bytes()
    with keep_freed_memory():  # as workers.engine.train.train runs: the time is the training run's
        run = TrainingSteps(spec, dev, seed)
        times = [run.step() for _ in range(warmup + steps)][warmup:]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
        process_peak = torch.cuda.max_memory_reserved(dev)
        name = torch.cuda.get_device_name(dev)
    else:
        process_peak = _rss_peak_bytes()
        peak = process_peak - base
        name = "cpu"
    profile = profile_for_device(dev.type, name)
    return Measurement(
        device=dev.type,
        device_name=name,
        hardware=profile.key if profile else None,
        precision=spec.training.precision,
        steps=steps,
        step_seconds=statistics.median(times),
        min_step_seconds=min(times),
        step_times=times,
        tokens_per_step=spec.tokens_per_step,
        peak_bytes=max(0, peak),
        process_peak_bytes=process_peak,
        threads=torch.get_num_threads(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.engine.calibrate", description=__doc__)
    parser.add_argument("spec", type=Path, help="a spec as JSON")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    args = parser.parse_args(argv)
    spec = load_spec(json.loads(args.spec.read_text()))
    result = measure_training(spec, steps=args.steps, warmup=args.warmup, device=args.device)
    print(json.dumps(result.as_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
