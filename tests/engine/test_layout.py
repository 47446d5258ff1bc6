"""A run folder's names: the ones the engine has always written, spelled in one place."""

from __future__ import annotations

from pathlib import Path

from workers.engine.layout import JobLayout, RunLayout


def test_a_run_folder_keeps_its_names_and_a_checkpoint_knows_its_run(tmp_path: Path) -> None:
    run = RunLayout.at(tmp_path / "run")
    assert run.spec == tmp_path / "run" / "spec.json"
    assert run.prepared_data == tmp_path / "run" / "data"
    assert run.metrics == tmp_path / "run" / "metrics.jsonl"
    assert run.tensorboard == tmp_path / "run" / "tensorboard"
    assert run.checkpoint(20) == tmp_path / "run" / "checkpoints" / "step-000020"
    assert RunLayout.of_checkpoint(run.checkpoint(20)) == run
    assert JobLayout.at(tmp_path).run == RunLayout(tmp_path / "run")
