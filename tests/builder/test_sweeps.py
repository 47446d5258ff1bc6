"""Sweeps through real services (Redis, beat, Celery workers) on a tiny model: a sweep of 6 trials with parallelism
2 finishes, prunes a clearly bad trial (a learning rate of 1e-6 learns nothing), survives a worker killed in the
middle without losing a trial, and its best trial saves as a configuration version."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import connection
from rest_framework.test import APIClient

from builder.configs.models import Config, ConfigVersion
from builder.datasets.models import Dataset
from builder.jobs.models import Job, JobEvent
from builder.sweeps import study as studies
from builder.sweeps.models import Sweep, Trial
from tests.conftest import signed_in
from tests.services import (
    point_at_redis,
    service_env,
    start_beat,
    start_redis,
    start_worker,
    wait_for,
    wait_worker_ready,
)
from workers.engine.spec import load_spec

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

CORPUS = "\n\n".join(
    " ".join(f"the expert {(i + j) % 7} routes token {j % 5} to layer {i % 3}." for j in range(8)) for i in range(60)
)
TINY: dict[str, Any] = {
    "model": {
        "vocab_size": 260, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "max_seq_len": 32,
        "moe": {"num_routed_experts": 4, "num_shared_experts": 1, "top_k": 2, "expert_hidden_size": 32},
    },
    "training": {
        "batch_size": 4, "max_steps": 30, "log_interval": 1, "eval_interval": 10, "eval_batches": 2,
        "checkpoint_interval": 10, "schedule": {"warmup_steps": 2}, "optimizer": {"lr": 3e-3},
    },
    "data": {"tokenizer": "bytes", "seq_len": 32, "val_fraction": 0.1},
}  # fmt: skip
LR = "training.optimizer.lr"
TOP_K = "model.moe.top_k"
BAD_LR = 1e-6  # learns nothing in 30 steps: its validation loss stays near ln(260) while the others fall


@pytest.fixture
def base(alice: Any, media_root: Path) -> tuple[ConfigVersion, Dataset]:
    config = Config.objects.create(owner=alice, name="tiny moe")
    version = ConfigVersion.objects.create(config=config, number=1, spec=load_spec(TINY).model_dump(mode="json"))
    name = default_storage.save("datasets/test/sweep-corpus.txt", ContentFile(CORPUS.encode()))
    dataset = Dataset.objects.create(
        owner=alice, name="tiny corpus", format="txt", file_name=name, size_bytes=len(CORPUS), state="ready"
    )
    return version, dataset


def test_a_sweep_finishes_prunes_a_bad_trial_loses_none_to_a_killed_worker_and_saves_its_best(
    alice: Any, charlie: Any, base: tuple[ConfigVersion, Dataset], tmp_path: Path
) -> None:
    version, dataset = base
    redis_service, url = start_redis(tmp_path / "redis")
    env = service_env(
        url,
        str(connection.settings_dict["NAME"]),
        Path(settings.MEDIA_ROOT),
        JOBS_WORK_DIR=str(settings.JOBS_WORK_DIR),
        # A lease short enough to take the killed worker's job back soon, long enough that a heartbeat late on
        # a busy machine does not lose it.
        JOB_HEARTBEAT_SECONDS="2",
        JOB_LEASE_SECONDS="10",
        JOB_REAPER_INTERVAL_SECONDS="1",
        SWEEP_POLL_SECONDS="2",
        OMP_NUM_THREADS="1",  # two trials train at once on two cores
        SWEEP_TICK_LEASE_SECONDS="10",
        REPORTS_AUTO_EVALUATE="false",  # no evaluation: this test is about the sweep
    )
    services = [redis_service]
    previous_broker = settings.CELERY_BROKER_URL
    point_at_redis(url)  # this test's sends (the first tick) go to this stack's Redis
    try:
        # Three processes: two trials train while a third ticks (in production ticks have the cpu workers).
        first = start_worker(env, tmp_path, "doomed", concurrency=3)
        services.append(first)
        wait_worker_ready(first, url)
        services.append(start_beat(env, tmp_path))

        owner = signed_in(alice, APIClient)
        began = time.monotonic()
        response = owner.post(
            "/api/sweeps",
            {
                "name": "tune lr",
                "config_version": version.pk,
                "dataset": dataset.pk,
                "space": [
                    {"path": LR, "kind": "float", "low": 1e-6, "high": 1e-2, "log": True},
                    {"path": TOP_K, "kind": "choice", "choices": [1, 2]},
                ],
                "budget": 6,
                "parallelism": 2,
                "seed": 7,
                # Three good trials first; the bad one is asked when two trials have ended, i.e. once the median
                # pruner has the two completed trials it waits for (a trial cannot be pruned before that).
                "first_trials": [
                    {LR: 3e-3, TOP_K: 2},
                    {LR: 2e-3, TOP_K: 2},
                    {LR: 1e-3, TOP_K: 2},
                    {LR: BAD_LR, TOP_K: 2},
                ],
            },
            format="json",
        )
        assert response.status_code == 201, response.content
        sweep_id = response.json()["id"]

        def running_trial_past_a_checkpoint() -> Trial | None:
            for trial in Trial.objects.filter(sweep_id=sweep_id, state="running").select_related("job"):
                if trial.params[LR] == BAD_LR:
                    continue  # a good trial: it runs to its end, after the worker that ran it is killed
                job = trial.job
                if job is not None and job.state == "running" and 10 <= (job.last_checkpoint_step or 0) < 25:
                    return trial
            return None

        # Kill the worker (no goodbye) in the middle of the sweep, while a trial trains past a checkpoint.
        wait_for(lambda: Trial.objects.filter(sweep_id=sweep_id).count() >= 3, 300, "the third trial")
        victim = wait_for(running_trial_past_a_checkpoint, 120, "a running trial past a checkpoint", interval=0.05)
        first.stop(sig=signal.SIGKILL)
        second = start_worker(env, tmp_path, "rescuer", concurrency=3)
        services.append(second)

        def ended() -> Sweep | None:
            sweep = Sweep.objects.get(pk=sweep_id)
            return sweep if sweep.is_final else None

        sweep = wait_for(ended, 600, "the sweep to end", interval=0.5)
        print(f"\nsweep of 6 trials (parallelism 2, a worker killed) took {time.monotonic() - began:.1f} s")
        assert sweep.state == "finished", sweep.error

        trials = list(Trial.objects.filter(sweep=sweep).select_related("job").order_by("number"))
        assert [t.number for t in trials] == list(range(6))
        assert all(t.state in ("complete", "pruned") for t in trials), [(t.number, t.state, t.reason) for t in trials]
        assert all(t.job is not None for t in trials)  # every trial ran as a job of its own
        assert len({t.job_id for t in trials}) == 6
        # No trial lost: the study agrees with the rows, and none is left running in it.
        with studies.storage_session() as storage:
            import optuna

            study = optuna.load_study(study_name=sweep.study_name, storage=storage)
            told = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
        assert told == {t.number: t.state.upper() for t in trials}

        # The killed trial's job was taken over and resumed; its trial stayed attached and finished.
        victim.refresh_from_db()

        def settled() -> Job | None:  # a pruned trial's job may still wait for the reaper to end it
            return Job.objects.filter(pk=victim.job_id, state__in=("succeeded", "cancelled", "failed")).first()

        killed = wait_for(settled, 120, "the killed trial's job to end")
        said = " ".join(
            r.get("reason") or ""
            for r in JobEvent.objects.filter(job=killed, kind="state").values_list("data", flat=True)
        )
        if victim.state == "complete":
            assert killed.state == "succeeded" and killed.attempts >= 2, (killed.state, killed.attempts)
            assert "expired" in said and JobEvent.objects.filter(job=killed, kind="resume").exists()
        else:  # pruned while its worker was dead: the reaper ends the job cancelled, with the pruner's reason
            assert victim.state == "pruned" and killed.state == "cancelled", (victim.state, killed.state)
            assert "pruned" in said

        # The bad trial was pruned, with the reason; a pruned trial still training was cancelled with it.
        bad = next(t for t in trials if t.params[LR] == BAD_LR)
        assert bad.state == "pruned" and bad.reason.startswith("pruned at step"), bad.reason
        pruned_jobs = [t.job_id for t in trials if t.state == "pruned" and t.job_id is not None]
        for pruned_job in pruned_jobs:

            def stopped(pk: int = pruned_job) -> Job | None:
                return Job.objects.filter(pk=pk, state__in=("cancelled", "succeeded")).first()

            # A pruned trial is over at once; its job stops within a step of the cancel (or had just ended).
            job = wait_for(stopped, 60, f"pruned job {pruned_job} to stop")
            if job.state == "cancelled":
                reasons = JobEvent.objects.filter(job=job, kind="state").values_list("data", flat=True)
                assert any("pruned" in (r.get("reason") or "") for r in reasons)
        complete = [t for t in trials if t.state == "complete"]
        assert complete and all(t.objective is not None and t.objective < 5.0 for t in complete)

        detail = owner.get(f"/api/sweeps/{sweep_id}").json()
        best = min(complete, key=lambda t: t.objective or 0)
        assert detail["best"]["number"] == best.number
        assert set(detail["importances"]) <= {LR, TOP_K}
        print(
            f"best trial {best.number}: val_loss {best.objective:.3f} with {best.params}; "
            f"importances {detail['importances']}"
        )

        # The outsider sees nothing.
        outsider = signed_in(charlie, APIClient)
        assert outsider.post(f"/api/sweeps/{sweep_id}/save-best", {}, format="json").status_code == 404

        # The owner saves the best trial as a new version of the configuration (the page's button: tests/e2e).
        saved = owner.post(f"/api/sweeps/{sweep_id}/save-best", {}, format="json")
        assert saved.status_code == 201, saved.content
        new = ConfigVersion.objects.get(config_id=version.config_id, number=2)
        assert new.note.startswith(f"best trial {best.number} of sweep")
        assert new.spec["training"]["optimizer"]["lr"] == best.params[LR]
        assert new.spec["model"]["moe"]["top_k"] == best.params[TOP_K]
        # A finished sweep cannot be stopped.
        assert owner.post(f"/api/sweeps/{sweep_id}/stop").status_code == 409
    finally:
        for service in reversed(services):
            service.stop()
        point_at_redis(previous_broker)
