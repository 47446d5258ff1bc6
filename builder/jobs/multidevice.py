"""Train a job on several devices: the worker launches the ranks and stays in control of them.

``builder.jobs.runner.run_job`` calls ``train_on_devices`` instead of the engine's ``train`` when the spec asks for
``training.distributed.devices > 1``. The ranks are child processes of torch's elastic launcher
(``workers.engine.distributed.launch_command``: ``python -m torch.distributed.run --standalone ...``), itself a child
of this worker process; everything else stays here, exactly as for one device:

- **Metrics.** The ranks run the engine only: no Django, no database connection, no lease in them. Rank 0 appends
  its points and events to the run's JSON lines file (``metrics.jsonl``, which the 1-device path also writes first,
  so it is always at least as far as any checkpoint), and this process tails the file into the same sink as one
  device's (database + Channels stream, TensorBoard, remote storage's checkpoint upload). Why a file rather than
  rank 0 building the Django sink: the lease, the cancel flag and the sink's fencing stay in one process, the
  engine stays free of the web side, and a rank that dies cannot leave a half-written database batch.
- **Heartbeat** is the runner's, unchanged.
- **Cancel** (and **preemption**: SIGTERM to this process at a warm shutdown, or when its worker dies) is written
  to the run folder's stop file; rank 0 reads it before each step and the ranks agree to stop together, write the
  final checkpoint, and return ``stopped`` / ``preempted`` as one device does.
- **Lease lost**: the launcher's whole process group is killed at once, writing nothing more.
- **A rank that dies** makes the launcher end the others and exit non-zero (``--max-restarts=0``): the attempt
  fails and the job is queued again to resume from its last checkpoint (recorded as a preemption, with a
  ``rank_failed`` event), at most ``MAX_RANK_FAILURES`` times in a row; then the job fails.
- **The reaper** needs nothing new: the ranks die with the launcher and the launcher with this process
  (``PR_SET_PDEATHSIG``), so a worker that vanishes leaves no orphan training, and the lease expires as for one
  device.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from builder.core.process import die_with_parent
from builder.jobs import lifecycle
from builder.jobs.models import JobEvent
from workers.engine.checkpoint import checkpoint_step, latest_checkpoint
from workers.engine.distributed import RESULT_FILE, STOP_FILE, launch_command, launch_environment
from workers.engine.layout import RunLayout
from workers.engine.sinks import MetricsSink
from workers.engine.spec import Spec
from workers.engine.train import EngineConfigError, TrainResult

log = logging.getLogger(__name__)

#: A job whose ranks crash this many attempts in a row fails instead of being queued again.
MAX_RANK_FAILURES = 3
POLL_SECONDS = 0.25
#: Test-only: JSON of ``workers.engine.train.FaultInjection`` fields every rank trains with (e.g.
#: ``{"sleep_per_step_s": 0.2}``, so that a test can kill a rank mid-run). Unset in production.
FAULTS_ENV = "JOB_RANK_FAULTS"


def train_on_devices(
    job_id: int,
    lease: lifecycle.Lease,
    spec: Spec,
    run: RunLayout,
    sink: MetricsSink,
    *,
    lease_lost: Callable[[], bool],
    cancel_requested: Callable[[], bool],
    device: str,
    faults: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``spec`` (prepared into ``run.prepared_data``) on ``training.distributed.devices`` processes,
    forwarding rank 0's points to ``sink``; returns the engine's result as ``train`` would.

    Raises ``EngineConfigError`` for a spec or data the ranks refused. A crashed rank returns ``preempted`` (the
    job is queued again and resumes from its checkpoint) or, after ``MAX_RANK_FAILURES`` crashes in a row,
    ``failed``. ``faults``: test-only fault injection passed to the ranks (default: ``FAULTS_ENV``'s).
    """
    if faults is None and os.environ.get(FAULTS_ENV):
        faults = json.loads(os.environ[FAULTS_ENV])
    devices = spec.training.distributed.devices
    spec_file = run.root / "distributed-spec.json"
    spec_file.write_text(spec.model_dump_json())
    for stale in (STOP_FILE, RESULT_FILE):
        (run.root / stale).unlink(missing_ok=True)
    run.metrics.touch()
    tail = _Tail(run.metrics, sink)
    command = launch_command(
        spec_file=spec_file,
        prepared=run.prepared_data,
        out_dir=run.root,
        device=device,
        devices=devices,
        faults=faults,
    )
    # Its own session: on a lost lease the launcher and every rank go at once (killpg); PDEATHSIG: the launcher
    # never outlives this process.
    process = subprocess.Popen(
        command, env=launch_environment(devices, device), start_new_session=True, preexec_fn=die_with_parent
    )
    log.info("job %s: %d ranks launched (pid %s)", job_id, devices, process.pid)
    with _PreemptOnSigterm(run.root / STOP_FILE):
        stop_written = False
        while process.poll() is None:
            tail.forward()
            if lease_lost():
                # Another worker owns the job now: end every rank without a checkpoint or another point.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            if not stop_written and cancel_requested():
                _write_stop(run.root / STOP_FILE, "stop")
                stop_written = True
            time.sleep(POLL_SECONDS)
    if lease_lost():
        return TrainResult("stopped", 0, None, None, "the lease moved to another worker")
    tail.forward()
    return _outcome(job_id, lease, run, process.returncode)


def _outcome(job_id: int, lease: lifecycle.Lease, run: RunLayout, returncode: int) -> TrainResult:
    """The ranks' result file, or what a crash means for the job."""
    result_file = run.root / RESULT_FILE
    # Rank 0 writes the file after the last collective (the final checkpoint): the run ended, even if the launcher
    # then exits non-zero (a SIGTERM that reached it too).
    if result_file.is_file():
        outcome = json.loads(result_file.read_text())
        if "error" in outcome:
            raise EngineConfigError(outcome["error"])
        checkpoint = outcome.pop("checkpoint")
        return TrainResult(**outcome, checkpoint=None if checkpoint is None else Path(checkpoint))
    crashes = _crashes_in_a_row(job_id) + 1
    reason = f"a training process died (launcher exit status {returncode})"
    last = latest_checkpoint(run.checkpoints)
    step = 0 if last is None else checkpoint_step(last)
    lifecycle.add_event(
        job_id,
        "rank_failed",
        {"exit_status": returncode, "in_a_row": crashes, "step": step},
        step=step,
        token=lease.token,
    )
    if crashes >= MAX_RANK_FAILURES:
        return TrainResult("failed", step, None, last, f"{reason}, {crashes} attempts in a row")
    # Queued again like a preempted job: the next attempt resumes from the last checkpoint.
    return TrainResult("preempted", step, None, last, f"{reason}: resuming from the last checkpoint")


def _crashes_in_a_row(job_id: int) -> int:
    """``rank_failed`` events since the job last trained to the end of an attempt (a resume that got further
    resets the count: only the events after the newest checkpoint event count)."""
    kinds = JobEvent.objects.filter(job_id=job_id, kind__in=("rank_failed", "checkpoint")).order_by("-seq")
    count = 0
    for kind in kinds.values_list("kind", flat=True)[:50]:
        if kind != "rank_failed":
            break
        count += 1
    return count


def _write_stop(path: Path, what: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(what)
    os.replace(tmp, path)  # rank 0 reads a whole word or nothing


class _PreemptOnSigterm:
    """While the ranks run, SIGTERM to this process (a warm shutdown, or its worker dying) asks them to preempt:
    checkpoint, then return "preempted". Only the main thread may install handlers (a prefork pool process's
    task runs there); elsewhere the launcher gets the signal through its own parent-death signal."""

    def __init__(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _PreemptOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        _write_stop(self.stop_file, "preempt")

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


class _Tail:
    """Follows rank 0's JSON lines file from its current end, handing each complete record to ``sink``."""

    def __init__(self, path: Path, sink: MetricsSink) -> None:
        self.path = path
        self.sink = sink
        self.offset = path.stat().st_size
        self.partial = b""

    def forward(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()  # an incomplete last line waits for its end
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("type") == "metrics":
                self.sink.emit(record["step"], {k: _number(v) for k, v in record["metrics"].items()})
            elif record.get("type") == "event":
                self.sink.event(record["kind"], record["data"])


def _number(value: Any) -> float:
    """A metric as ``JsonlSink`` wrote it: non-finite floats are the strings "nan", "inf", "-inf"."""
    return float(value)
