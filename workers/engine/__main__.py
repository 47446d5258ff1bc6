"""Command line: ``python -m workers.engine train ...``.

``train --spec S.json --data D.jsonl --out DIR [--resume] [--device cpu|cuda]`` trains with a progress bar,
writing ``DIR/metrics.jsonl`` (``JsonlSink``) and ``DIR/tensorboard/`` (``TensorBoardSink``). Exit status:

- 0: completed, early-stopped or stopped as asked (``--stop-after-step``);
- 75 (``EX_TEMPFAIL``): preempted by SIGTERM after writing a checkpoint; run again with ``--resume``;
- 1: training failed (an anomaly it could not recover from);
- 2: bad command line, spec (each problem with its field path), data (with line numbers) or directory.

The engine's throughput benchmark is not part of the engine: ``make bench`` runs ``python -m bench.engine``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later", what a preempted job should report


class ProgressSink:
    """A ``MetricsSink`` that drives a tqdm bar: position = step, postfix = latest loss and val loss."""

    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.postfix: dict[str, str] = {}

    def emit(self, step: int, metrics: Mapping[str, float]) -> None:
        if step >= self.bar.n:
            self.bar.update(step - self.bar.n)
        else:  # replay after a rollback: move the bar back
            self.bar.n = step
        for key in ("loss", "val_loss"):
            if key in metrics:
                self.postfix[key] = f"{metrics[key]:.4f}"
        self.bar.set_postfix(self.postfix, refresh=True)

    def event(self, kind: str, data: Mapping[str, Any]) -> None:
        if kind in ("intervention", "anomaly", "rollback", "early_stop", "resume"):
            self.bar.write(f"[{kind}] {json.dumps(dict(data), default=str)}")

    def flush(self) -> None:
        pass  # a progress bar records nothing a resumed run reads

    def close(self) -> None:
        self.bar.close()


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _train(args: argparse.Namespace) -> int:
    # Imported here so that ``--help`` and argument errors answer without loading torch.
    from pydantic import ValidationError

    from workers.engine.checkpoint import checkpoint_step, latest_checkpoint
    from workers.engine.data import DataFormatError
    from workers.engine.layout import RunLayout
    from workers.engine.sinks import FanoutSink, JsonlSink, TensorBoardSink
    from workers.engine.spec import load_spec, spec_errors
    from workers.engine.train import EngineConfigError, FaultInjection, train

    try:
        raw = json.loads(Path(args.spec).read_text())
    except OSError as exc:
        return _fail(f"cannot read spec {args.spec}: {exc.strerror}")
    except json.JSONDecodeError as exc:
        return _fail(f"{args.spec}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}")
    if not isinstance(raw, dict):
        return _fail(f"{args.spec}: the spec must be a JSON object")
    try:
        spec = load_spec(raw)
    except ValidationError as exc:
        lines = [f"  {e['path'] or '(root)'}: {e['message']}" for e in spec_errors(exc)]
        return _fail(f"invalid spec {args.spec}:\n" + "\n".join(lines))
    if not Path(args.data).is_file():
        return _fail(f"data file {args.data} does not exist")

    faults = FaultInjection()
    if args.inject_faults:
        f = json.loads(args.inject_faults)
        faults = FaultInjection(
            nan_at_steps=frozenset(f.get("nan_at_steps", ())),
            spike_at_steps=frozenset(f.get("spike_at_steps", ())),
            sleep_per_step_s=float(f.get("sleep_per_step_s", 0.0)),
        )

    run = RunLayout.at(args.out)
    latest = latest_checkpoint(run.checkpoints)
    if latest is not None and not args.resume:
        return _fail(f"{run.root} already holds a run (checkpoint {latest.name}): pass --resume or use a new --out")
    resumed_step = checkpoint_step(latest) if latest is not None else 0
    sinks: list[Any] = [
        JsonlSink(run.metrics),
        # The first step this process writes is resumed_step + 1: earlier runs' points after the
        # checkpoint (written before a crash) are purged so TensorBoard shows each step once.
        TensorBoardSink(run.tensorboard, purge_step=resumed_step + 1 if latest is not None else None),
    ]
    if not args.no_progress:
        sinks.append(ProgressSink(spec.training.max_steps, resumed_step))
    sink = FanoutSink(*sinks)
    try:
        result = train(
            spec,
            args.data,
            run.root,
            sink,
            resume=args.resume,
            device=args.device,
            stop_after_step=args.stop_after_step,
            faults=faults,
        )
    except DataFormatError as exc:
        return _fail(f"bad data: {exc}")
    except EngineConfigError as exc:
        return _fail(str(exc))
    finally:
        sink.close()
    print(
        json.dumps(
            {
                "status": result.status,
                "step": result.step,
                "best_val_loss": result.best_val_loss,
                "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                "reason": result.reason,
            }
        )
    )
    if result.status == "preempted":
        return EXIT_PREEMPTED
    if result.status == "failed":
        print(f"training failed: {result.reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers.engine", description="Train MoE models.")
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train a model from a spec on a data file")
    t.add_argument("--spec", required=True, help="spec JSON file")
    t.add_argument("--data", required=True, help="data file: .jsonl, .txt or .csv")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, tensorboard/)")
    t.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    t.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    t.add_argument("--stop-after-step", type=int, default=None, help="checkpoint and exit 0 after this step")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--inject-faults", default=None, help=argparse.SUPPRESS)  # tests: FaultInjection as JSON
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return _train(args)


if __name__ == "__main__":
    sys.exit(main())
