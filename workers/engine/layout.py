"""Where a run keeps its files: the one place the names of a run's folders and files are spelled.

A *run* folder is what ``train()`` writes into and what the command line's ``--out`` names::

    <run>/
      spec.json              the spec the run trains (written at every start)
      checkpoints/step-N/    committed checkpoints (``workers.engine.checkpoint``; a manifest is written last)
      data/                  the prepared data: tokenizer, token streams, labels (``workers.engine.data.prepare``)
      metrics.jsonl          every metric point and event (``JsonlSink``)
      tensorboard/           TensorBoard events (``TensorBoardSink``)

A *job* folder (on a worker, under ``JOBS_WORK_DIR``) wraps one run with what the platform adds::

    <job>/
      owner.json             which job row the folder belongs to (id and creation time)
      data/                  the training file, fetched from remote storage (or linked under its declared format)
      run/                   the run folder above (jobs started before this layout kept metrics.jsonl and
                             tensorboard/ beside it: ``adopt_legacy_files`` moves them in)

Only ``JobLayout.adopt_legacy_files`` changes the disk (and ``JobLayout.tensorboard`` looks at it); the rest only
names paths.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from workers.engine.checkpoint import checkpoint_dir_name


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run folder (see the module docstring)."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> RunLayout:
        return cls(Path(root))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike[str]) -> RunLayout:
        """The run a checkpoint folder (``<run>/checkpoints/step-N``) belongs to."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """The folder the checkpoint of ``step`` is committed to (it may not exist)."""
        return self.checkpoints / checkpoint_dir_name(step)

    @property
    def prepared_data(self) -> Path:
        return self.root / "data"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


@dataclass(frozen=True)
class JobLayout:
    """Every path of one job folder on a worker (see the module docstring)."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> JobLayout:
        return cls(Path(root))

    @property
    def owner(self) -> Path:
        return self.root / "owner.json"

    @property
    def source_data(self) -> Path:
        """The folder holding the job's training file when it is not read in place from local storage."""
        return self.root / "data"

    @property
    def run(self) -> RunLayout:
        return RunLayout(self.root / "run")

    @property
    def tensorboard(self) -> Path:
        """The run's TensorBoard folder (beside ``run/`` for a job that ended before this layout)."""
        legacy = self.root / "tensorboard"
        return legacy if legacy.is_dir() and not self.run.tensorboard.exists() else self.run.tensorboard

    def adopt_legacy_files(self) -> None:
        """Move what jobs started before this layout kept beside ``run/`` (``metrics.jsonl``, ``tensorboard/``)
        into it, so that a job queued across an upgrade resumes with its whole history."""
        moves = ((self.root / "metrics.jsonl", self.run.metrics), (self.root / "tensorboard", self.run.tensorboard))
        for legacy, current in moves:
            if legacy.exists() and not current.exists():
                current.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(legacy), str(current))
