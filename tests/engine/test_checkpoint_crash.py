"""A crash while a checkpoint is being written leaves the previous one in use, and the run resumes from it.

A training run in a subprocess is killed with SIGKILL (no handler, no ``finally``: a power cut, the OOM killer) at
one point inside ``save_checkpoint`` of step 20: half-way through the weights, half-way through the optimizer
state, with the manifest written but not committed, with the checkpoint committed in its scratch folder but not
yet renamed into place, and while pruning an older one after the commit. Then ``latest_checkpoint`` must name the
checkpoint of step 10 (step 20 for the crash after the commit), and a resumed run must continue from it and end
exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.tiny import tiny_spec
from workers.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from workers.engine.model import build_model
from workers.engine.optimizers import build_optimizer
from workers.engine.sinks import MemorySink
from workers.engine.train import train

REPO = Path(__file__).resolve().parents[2]
# The engine tests' tiny model (tests/engine/tiny.py), checkpointing every 10 steps, on the ``corpus`` fixture
# (tests/engine/conftest.py).
SPEC = tiny_spec(training={"max_steps": 30})
CRASH_STEP = 20

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py

# The run, killed by itself at ``point`` inside the save of CRASH_STEP. Each hook lets the real code run until the
# moment named, writes what a real write would have left (a torn file), then SIGKILLs the process.
CRASHING_RUN = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from workers.engine import checkpoint as ckpt
    from workers.engine import train as train_module
    from workers.engine.sinks import MemorySink
    from workers.engine.spec import Spec

    point, corpus, out, spec_file, crash_step = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    spec = Spec.model_validate_json(Path(spec_file).read_text())

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def torn(path):
        with open(path, "wb") as f:
            f.write(b"\\x00" * 4096)  # the first blocks of a file whose writer died
            f.flush()
            os.fsync(f.fileno())

    real_rename, real_rmtree, real_torch_save = os.rename, shutil.rmtree, torch.save

    def arm():
        if point == "weights":
            ckpt.save_model = lambda model, filename, metadata=None: (torn(filename), die())
        elif point == "optimizer":
            ckpt.torch.save = lambda obj, f, *a, **k: (torn(f), die())
        elif point == "manifest":
            def rename(src, dst):
                if str(src).endswith(".partial"):
                    die()  # the manifest is written and fsynced, not yet committed by its rename
                return real_rename(src, dst)
            ckpt.os.rename = rename
        elif point == "commit":
            def rename(src, dst):
                if Path(src).name.startswith(".tmp-step-"):
                    die()  # committed inside its scratch folder, not yet renamed into place
                return real_rename(src, dst)
            ckpt.os.rename = rename
        elif point == "prune":
            def rmtree(path, *a, **k):
                files = sorted(Path(path).iterdir())
                files[0].unlink()  # an older checkpoint half deleted
                die()
            ckpt.shutil.rmtree = rmtree

    real_save = train_module.save_checkpoint

    def save(root, step, **kwargs):
        if step == crash_step:
            arm()
        return real_save(root, step, **kwargs)

    train_module.save_checkpoint = save
    train_module.train(spec, Path(corpus), Path(out), MemorySink(), device="cpu")
    print("the run was not killed", flush=True)
    """
)
POINTS = {"weights": 10, "optimizer": 10, "manifest": 10, "commit": 10, "prune": CRASH_STEP}


@pytest.fixture(scope="module")
def uninterrupted(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final weights of the same run, never interrupted."""
    out = tmp_path_factory.mktemp("whole")
    assert train(SPEC, corpus, out, MemorySink(), device="cpu").status == "completed"
    return load_file(out / "checkpoints" / "step-000030" / "model.safetensors")


def crash(point: str, corpus: Path, out: Path) -> subprocess.CompletedProcess[str]:
    spec_file = out.parent / f"{out.name}-spec.json"
    spec_file.write_text(SPEC.model_dump_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", CRASHING_RUN, point, str(corpus), str(out), str(spec_file), str(CRASH_STEP)]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("point", list(POINTS))
def test_a_crash_inside_save_checkpoint_leaves_the_previous_one_in_use_and_the_run_resumes(
    point: str, corpus: Path, tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    out = tmp_path / "run"
    done = crash(point, corpus, out)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    checkpoints = out / "checkpoints"
    in_use = POINTS[point]
    latest = latest_checkpoint(checkpoints)
    assert latest == checkpoints / f"step-{in_use:06d}"
    if in_use < CRASH_STEP:
        # The killed write is there, torn or uncommitted, and is never taken for a checkpoint.
        assert any(p.name.startswith(".tmp-step-000020") for p in checkpoints.iterdir())
        assert not (checkpoints / "step-000020").exists()
    # The checkpoint in use loads whole into a fresh model and optimizer.
    model = build_model(SPEC)
    optimizer = build_optimizer(model, SPEC, torch.device("cpu"))
    assert load_checkpoint(latest, model=model, optimizer=optimizer).step == in_use

    sink = MemorySink()
    result = train(SPEC, corpus, out, sink, device="cpu")
    assert [e["step"] for e in sink.events_of("resume")] == [in_use]
    assert [s for s, _ in sink.series("loss")] == list(range(in_use + 1, 31))
    assert (result.status, result.step) == ("completed", 30)
    # Scratch folders of the killed writer are gone; the newest checkpoints verify and hold the same weights as
    # the run that was never interrupted.
    assert not any(p.name.startswith((".tmp-", ".trash-")) for p in checkpoints.iterdir())
    assert list_checkpoints(checkpoints, check_hashes=True)[-1].name == "step-000030"
    final = load_file(checkpoints / "step-000030" / "model.safetensors")
    assert final.keys() == uninterrupted.keys()
    assert all(torch.equal(final[name], uninterrupted[name]) for name in final)


def test_a_crash_while_replacing_a_step_falls_back_to_the_one_before(tmp_path: Path) -> None:
    """Re-saving a step (after a rollback) moves the old folder aside, then renames the new one in: killed between
    the two renames, neither copy of that step is used (their names are scratch names) and the step before is."""
    root = tmp_path / "checkpoints"
    model = build_model(SPEC)
    optimizer = torch.optim.AdamW(model.parameters())
    common: dict[str, Any] = {"model": model, "optimizer": optimizer, "spec": SPEC, "loop_state": {}, "data_state": {}}
    save_checkpoint(root, 10, **common)
    save_checkpoint(root, 20, **common)
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        import torch
        from workers.engine import checkpoint as ckpt
        from workers.engine.model import build_model
        from workers.engine.spec import Spec
        spec = Spec.model_validate_json(Path(sys.argv[2]).read_text())
        model = build_model(spec)
        real_rename = os.rename
        def rename(src, dst):
            if Path(src).name.startswith(".tmp-step-"):
                os.kill(os.getpid(), signal.SIGKILL)  # the old step-000020 is already in .trash
            return real_rename(src, dst)
        ckpt.os.rename = rename
        ckpt.save_checkpoint(sys.argv[1], 20, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                             spec=spec, loop_state={}, data_state={})
        """
    )
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(SPEC.model_dump_json())
    done = subprocess.run(
        [sys.executable, "-c", script, str(root), str(spec_file)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    names = sorted(p.name for p in root.iterdir())
    assert "step-000020" not in names and any(n.startswith(".trash-step-000020") for n in names)
    assert latest_checkpoint(root) == root / "step-000010"
    assert load_checkpoint(root / "step-000010", model=build_model(SPEC)).step == 10
