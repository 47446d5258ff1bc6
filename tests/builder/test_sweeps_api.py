"""The sweeps API without workers: the search space is checked against the spec (each error names its field), only
the owner sees or controls a sweep (charlie, the outsider, gets 404), and the endpoints are in the OpenAPI schema.
The sweeps that run are in tests/builder/test_sweeps.py."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from builder.configs.models import Config, ConfigVersion
from builder.datasets.models import Dataset
from builder.sweeps.models import Sweep, Trial, TrialState
from builder.sweeps.space import apply, parse_space
from tests.conftest import signed_in
from workers.engine.spec import load_spec

pytestmark = pytest.mark.django_db

TINY: dict[str, Any] = {
    "model": {
        "vocab_size": 260, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "max_seq_len": 32,
        "moe": {"num_routed_experts": 4, "num_shared_experts": 1, "top_k": 2, "expert_hidden_size": 32},
    },
    "training": {"batch_size": 4, "max_steps": 40, "eval_interval": 10, "schedule": {"warmup_steps": 2}},
    "data": {"tokenizer": "bytes", "seq_len": 32},
}  # fmt: skip
LR: dict[str, Any] = {"path": "training.optimizer.lr", "kind": "float", "low": 1e-4, "high": 3e-3, "log": True}


@pytest.fixture
def version(alice: Any) -> ConfigVersion:
    config = Config.objects.create(owner=alice, name="tiny")
    spec = load_spec(TINY).model_dump(mode="json")
    return ConfigVersion.objects.create(config=config, number=1, spec=spec)


@pytest.fixture
def dataset(alice: Any) -> Dataset:
    return Dataset.objects.create(
        owner=alice, name="corpus", format="txt", file_name="datasets/x.txt", size_bytes=10, state="ready"
    )


@pytest.fixture
def no_worker() -> Any:
    """Tasks sent during the test go nowhere (a closed port), so that the rows stay as the test's own ticks leave
    them: once the session's services run, the app sends to their Redis, whose worker would train these jobs."""
    from django.conf import settings

    from tests.services import point_at_redis

    before = settings.CELERY_BROKER_URL
    point_at_redis("redis://127.0.0.1:9/0")
    try:
        yield
    finally:
        point_at_redis(before)


def body(version: ConfigVersion, dataset: Dataset, **changes: Any) -> dict[str, Any]:
    return {"name": "tune", "config_version": version.pk, "dataset": dataset.pk, "space": [LR], **changes}


def test_a_space_over_the_issue_fields_is_accepted_and_applies_to_the_spec(version: ConfigVersion) -> None:
    space = [
        LR,
        {"path": "model.moe.num_routed_experts", "kind": "choice", "choices": [4, 8, 16]},
        {"path": "model.moe.top_k", "kind": "choice", "choices": [1, 2]},
    ]
    params = parse_space(space, version.spec)
    assert [p.path for p in params] == [s["path"] for s in space]
    assert params[0].distribution().log and params[1].distribution().choices == (4, 8, 16)
    trial = apply(version.spec, {"training.optimizer.lr": 2e-4, "model.moe.num_routed_experts": 16})
    spec = load_spec(trial)
    assert spec.training.optimizer.lr == 2e-4 and spec.model.moe.num_routed_experts == 16
    assert version.spec["training"]["optimizer"]["lr"] != 2e-4  # the base is not changed


@pytest.mark.parametrize(
    ("space", "field", "words", "status"),
    [
        ([{**LR, "path": "training.optimizer.lrr"}], "space.0.path", "no field", 422),
        ([{"path": "model.moe", "kind": "choice", "choices": [1]}], "space.0.path", "section", 422),
        ([{**LR, "high": 3.0}], "space.0.high", "training.optimizer.lr", 422),
        ([{**LR, "low": 0}], "space.0.low", "log scale", 422),
        ([{**LR, "low": 1e-2}], "space.0.high", "above low", 422),
        ([{"path": "model.moe.top_k", "kind": "float", "low": 1, "high": 2}], "space.0.kind", "integer field", 422),
        ([{"path": "model.moe.top_k", "kind": "choice", "choices": [1, 64]}], "space.0.choices.1", "32", 422),
        ([{"path": "model.moe.top_k", "kind": "int", "low": 1.5, "high": 2}], "space.0.low", "integer", 422),
        ([{"path": "data.text_field", "kind": "choice", "choices": ["a"]}], "space.0.path", "dataset", 422),
        ([LR, LR], "space.1.path", "twice", 422),
        ([], "space", "1 to 20", 422),
        # What the published schema states is a 400: the kind's values, a bound's type, a parameter's shape.
        ([{"path": "model.moe.top_k", "kind": "range"}], "space.0.kind", "float, int or choice", 400),
        ([{**LR, "low": "small"}], "space.0.low", "a number", 400),
        (["lr"], "space.0", "an object", 400),
    ],
)  # fmt: skip
def test_each_bad_path_range_or_choice_is_refused_naming_its_field(
    alice: Any, version: ConfigVersion, dataset: Dataset, space: Any, field: str, words: str, status: int
) -> None:
    response = signed_in(alice, APIClient).post("/api/sweeps", body(version, dataset, space=space), format="json")
    assert response.status_code == status, response.content
    errors = response.json()
    assert field in errors, errors
    assert words in " ".join(errors[field]), errors
    assert not Sweep.objects.exists()


def test_the_other_fields_are_checked_too(alice: Any, charlie: Any, version: ConfigVersion, dataset: Dataset) -> None:
    client = signed_in(alice, APIClient)
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("budget", {"budget": 0}, 400),  # below the published minimum
        ("parallelism", {"budget": 2, "parallelism": 3}, 422),
        ("objective", {"objective": "val_accuracy"}, 422),  # the tiny model is a language model
        ("first_trials.0.training.optimizer.lr", {"first_trials": [{"training.optimizer.lr": 0.5}]}, 422),
        ("queue", {"queue": "tpu"}, 422),
    ]
    for field, changes, status in cases:
        response = client.post("/api/sweeps", body(version, dataset, **changes), format="json")
        assert response.status_code == status and field in response.json(), (field, response.json())
    # Charlie cannot search around alice's configuration, nor train on her dataset.
    response = signed_in(charlie, APIClient).post("/api/sweeps", body(version, dataset), format="json")
    assert response.status_code == 422 and "config_version" in response.json()


def test_only_the_owner_sees_stops_and_saves_a_sweep(
    alice: Any, charlie: Any, version: ConfigVersion, dataset: Dataset
) -> None:
    first = [{"training.optimizer.lr": 1e-3}]
    response = signed_in(alice, APIClient).post(
        "/api/sweeps", body(version, dataset, first_trials=first), format="json"
    )
    assert response.status_code == 201, response.content
    sweep = response.json()
    assert sweep["state"] == "queued" and sweep["running"] and sweep["trials"] == []
    assert sweep["space"] == [LR] and sweep["first_trials"] == first
    url = f"/api/sweeps/{sweep['id']}"
    outsider = signed_in(charlie, APIClient)
    assert outsider.get(url).status_code == 404
    assert outsider.post(f"{url}/stop").status_code == 404
    assert outsider.post(f"{url}/save-best", {}, format="json").status_code == 404
    assert outsider.get("/api/sweeps").json() == []
    assert outsider.get(f"/sweeps/{sweep['id']}/").status_code == 404
    assert APIClient().get(url).status_code == 401

    owner = signed_in(alice, APIClient)
    assert [s["id"] for s in owner.get("/api/sweeps").json()] == [sweep["id"]]
    # Nothing completed yet: there is no best trial to save.
    refused = owner.post(f"{url}/save-best", {}, format="json")
    assert refused.status_code == 409 and "no trial" in refused.json()["detail"]
    stopped = owner.post(f"{url}/stop")
    assert stopped.status_code == 200 and stopped.json()["stop_requested"]
    assert owner.get(f"/sweeps/{sweep['id']}/").status_code == 200
    listed = signed_in(alice).get("/sweeps/").content.decode()
    assert f'href="/sweeps/{sweep["id"]}/"' in listed and 'data-testid="sweeps-table"' in listed
    assert 'data-testid="no-sweeps"' in signed_in(charlie).get("/sweeps/").content.decode()


def test_save_best_makes_a_new_version_of_the_best_completed_trial(
    alice: Any, version: ConfigVersion, dataset: Dataset
) -> None:
    response = signed_in(alice, APIClient).post("/api/sweeps", body(version, dataset), format="json")
    sweep = Sweep.objects.get(pk=response.json()["id"])
    for number, lr, objective, state in [
        (0, 1e-3, 2.5, "complete"),
        (1, 2e-3, 2.1, "complete"),
        (2, 3e-3, 1.0, "pruned"),
    ]:
        Trial.objects.create(
            sweep=sweep, number=number, params={"training.optimizer.lr": lr}, objective=objective, state=state
        )
    saved = signed_in(alice, APIClient).post(f"/api/sweeps/{sweep.pk}/save-best", {"note": ""}, format="json")
    assert saved.status_code == 201, saved.content
    new = ConfigVersion.objects.get(pk=saved.json()["id"])
    assert new.config_id == version.config_id and new.number == 2
    assert new.spec["training"]["optimizer"]["lr"] == 2e-3  # trial 1: the best *completed* one (lower loss)
    assert "best trial 1" in new.note and "2.1" in new.note
    detail = signed_in(alice, APIClient).get(f"/api/sweeps/{sweep.pk}").json()
    assert detail["best"]["number"] == 1 and detail["saved_version"]["number"] == 2
    assert detail["counts"] == {TrialState.COMPLETE: 2, TrialState.PRUNED: 1}


def test_the_endpoints_are_in_the_openapi_schema(alice: Any) -> None:
    schema = signed_in(alice, APIClient).get("/api/schema", {"format": "json"}).json()
    paths = schema["paths"]
    assert {"post", "get"} <= set(paths["/api/sweeps"])
    assert "get" in paths["/api/sweeps/{sweep_id}"]
    assert "post" in paths["/api/sweeps/{sweep_id}/stop"] and "post" in paths["/api/sweeps/{sweep_id}/save-best"]
    assert "404" in paths["/api/sweeps/{sweep_id}"]["get"]["responses"]
    assert "409" in paths["/api/sweeps/{sweep_id}/save-best"]["post"]["responses"]


WIZARD_ANSWERS = {
    "task": "generation", "num_labels": "2", "data_size": "tiny", "hardware": "cpu", "num_gpus": "1",
    "hours": "0.25", "priority": "quality",
}  # fmt: skip


def test_the_wizard_starts_a_small_sweep_of_the_learning_rate_around_its_proposal(alice: Any, charlie: Any) -> None:
    from builder.datasets.demo import CORPUS_SLUG

    Dataset.objects.create(
        name="built-in corpus", slug=CORPUS_SLUG, origin="builtin", format="txt", file_name="datasets/c.txt",
        size_bytes=10, state="ready",
    )  # fmt: skip
    client = signed_in(alice)
    saved = client.post("/configure/wizard/save/", {**WIZARD_ANSWERS, "name": "proposal", "then": "tune_lr"})
    config = Config.objects.get(owner=alice, name="proposal")
    assert saved.status_code == 302 and saved["Location"] == f"/sweeps/tune-lr/{config.pk}/"
    proposed = config.latest.spec["training"]["optimizer"]["lr"]
    plan = client.get(saved["Location"])
    assert plan.status_code == 200 and b'data-testid="tune-plan"' in plan.content
    assert signed_in(charlie).get(saved["Location"]).status_code == 404
    assert signed_in(charlie).post(saved["Location"]).status_code == 404

    started = client.post(saved["Location"])
    sweep = Sweep.objects.get(owner=alice)
    assert started.status_code == 302 and started["Location"] == f"/sweeps/{sweep.pk}/"
    assert sweep.config_version == config.latest and sweep.budget == 6 and sweep.parallelism == 2
    (lr,) = sweep.space
    assert lr["path"] == "training.optimizer.lr" and lr["log"]
    assert lr["low"] == pytest.approx(proposed / 3) and lr["high"] == pytest.approx(min(proposed * 3, 1.0))
    assert sweep.first_trials == [{"training.optimizer.lr": proposed}]  # the proposal itself is tried first
    page = client.get(started["Location"]).content.decode()
    assert 'data-testid="trials-table"' in page and "sweep-page-config" in page


@pytest.mark.django_db(transaction=True)  # the study's storage reads the rows through a connection of its own
def test_a_tick_fails_a_refused_trial_without_a_job_and_a_stop_cancels_the_active_ones(
    no_worker: None, alice: Any, version: ConfigVersion, dataset: Dataset
) -> None:
    """Ticks run in this process (no worker: the jobs they submit stay queued), against the real study storage."""
    from builder.jobs.models import Job
    from builder.sweeps import services
    from builder.sweeps import study as studies
    from builder.sweeps.runner import run_tick

    top_k = {"path": "model.moe.top_k", "kind": "choice", "choices": [1, 2, 8]}  # 8 > the 4 experts: the rules
    hidden = {"path": "model.hidden_size", "kind": "choice", "choices": [32, 16384]}  # 16384: does not fit the CPU
    request = services.SweepRequest(
        name="tick", config_version=version.pk, dataset=dataset.pk, space=[top_k, hidden], budget=5, parallelism=2,
        first_trials=[
            {"model.moe.top_k": 8, "model.hidden_size": 32}, {"model.moe.top_k": 2, "model.hidden_size": 16384},
            {"model.moe.top_k": 2, "model.hidden_size": 32}, {"model.moe.top_k": 1, "model.hidden_size": 32},
        ],
    )  # fmt: skip
    sweep = services.start_sweep(alice, request)
    assert run_tick(sweep.pk, "test")["outcome"] == "waiting"
    trials = {t.number: t for t in Trial.objects.filter(sweep=sweep)}
    # Refused trials count against the budget, name the reason, and have no job; two others fill the parallelism.
    assert [trials[n].state for n in (0, 1)] == [TrialState.FAILED] * 2 and not (trials[0].job or trials[1].job)
    assert "refused before dispatch" in trials[0].reason and "top_k (8) cannot exceed" in trials[0].reason
    assert "refused before dispatch" in trials[1].reason and "cannot train on" in trials[1].reason
    assert [trials[n].state for n in (2, 3)] == [TrialState.RUNNING] * 2, [trials[n].reason for n in (2, 3)]
    jobs = [trials[n].job for n in (2, 3)]
    assert [j.spec["model"]["moe"]["top_k"] for j in jobs if j is not None] == [2, 1]
    assert all(j is not None and j.state == "queued" for j in jobs)
    assert run_tick(sweep.pk, "test")["outcome"] == "not claimable"  # waiting: only a requested tick runs
    dashboard = signed_in(alice).get(f"/jobs/{trials[2].job_id}/").content.decode()  # the job says whose trial
    assert f'href="/sweeps/{sweep.pk}/" data-testid="sweep-link">trial 2 of sweep' in dashboard

    services.stop_sweep(sweep)
    assert Sweep.objects.get(pk=sweep.pk).state == "queued"
    assert run_tick(sweep.pk, "test")["outcome"] == "stopped"
    sweep.refresh_from_db()
    assert sweep.state == "stopped" and sweep.is_final
    stopped = Trial.objects.filter(sweep=sweep, number__in=[2, 3])
    assert {t.state for t in stopped} == {TrialState.CANCELLED}
    assert {t.reason for t in stopped} == {"the sweep was stopped"}
    assert set(Job.objects.filter(sweep_trial__sweep=sweep).values_list("state", flat=True)) == {"cancelled"}
    assert Trial.objects.filter(sweep=sweep).count() == 4  # nothing asked after the stop
    with studies.storage_session() as storage:
        import optuna

        told = optuna.load_study(study_name=sweep.study_name, storage=storage).get_trials(deepcopy=False)
    assert [t.state.name for t in told] == ["FAIL"] * 4


async def _socket(user: Any, sweep_id: int) -> list[dict[str, Any]]:
    """Connect to the sweep's socket as ``user``: its first message (a snapshot), an answer to a message it does
    not take, then the snapshot a tick's ``sweep.changed`` brings; or how it was refused."""
    from channels.layers import get_channel_layer
    from channels.routing import URLRouter
    from channels.testing import WebsocketCommunicator

    from builder.sweeps.routing import websocket_urlpatterns
    from builder.sweeps.work import group_name

    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/sweeps/{sweep_id}/")
    communicator.scope["user"] = user
    connected, code = await communicator.connect(timeout=30)
    if not connected:
        return [{"type": "refused", "code": code}]
    replies = [await communicator.receive_json_from(timeout=30)]
    await communicator.send_json_to({"type": "resync"})
    replies.append(await communicator.receive_json_from(timeout=30))
    await get_channel_layer().group_send(group_name(sweep_id), {"type": "sweep.changed"})
    replies.append(await communicator.receive_json_from(timeout=30))
    await communicator.disconnect()
    return replies


@pytest.mark.django_db(transaction=True)  # the consumer reads through database_sync_to_async's own connections
def test_the_socket_serves_the_owner_snapshots_and_refuses_everyone_else(
    alice: Any, charlie: Any, version: ConfigVersion, dataset: Dataset, settings: Any
) -> None:
    from asgiref.sync import async_to_sync
    from django.contrib.auth.models import AnonymousUser

    # One process here: the in-memory layer carries the group message a tick would publish through Redis.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    response = signed_in(alice, APIClient).post("/api/sweeps", body(version, dataset), format="json")
    sweep_id = response.json()["id"]
    first, refused, changed = async_to_sync(_socket)(alice, sweep_id)
    assert first["type"] == "snapshot" and first["sweep"]["id"] == sweep_id and first["sweep"]["space"] == [LR]
    assert refused["type"] == "error" and refused["field"] == "type"
    assert changed["type"] == "snapshot" and changed["sweep"]["id"] == sweep_id
    assert async_to_sync(_socket)(charlie, sweep_id) == [{"type": "refused", "code": 4404}]
    assert async_to_sync(_socket)(AnonymousUser(), sweep_id) == [{"type": "refused", "code": 4401}]


def test_ids_beyond_a_database_integer_are_refused_not_a_server_error(
    alice: Any, version: ConfigVersion, dataset: Dataset
) -> None:
    huge = 6518275700690105925632
    client = signed_in(alice, APIClient)
    assert client.get(f"/api/sweeps/{huge}").status_code == 404
    assert client.post(f"/api/sweeps/{huge}/stop").status_code == 404
    assert signed_in(alice).get(f"/sweeps/{huge}/").status_code == 404
    assert signed_in(alice).get(f"/sweeps/tune-lr/{huge}/").status_code == 404
    for field in ("config_version", "dataset"):
        response = client.post("/api/sweeps", {**body(version, dataset), field: huge}, format="json")
        assert response.status_code == 400 and field in response.json()  # beyond the published maximum


@pytest.mark.django_db(transaction=True)
def test_a_trial_past_the_owners_job_limit_waits_and_is_submitted_when_a_job_ends(
    no_worker: None, alice: Any, version: ConfigVersion, dataset: Dataset, settings: Any
) -> None:
    from builder.jobs import lifecycle
    from builder.sweeps import services
    from builder.sweeps.runner import run_tick

    settings.JOBS_MAX_ACTIVE_PER_USER = 1
    request = services.SweepRequest(
        name="limited", config_version=version.pk, dataset=dataset.pk, space=[LR], budget=3, parallelism=2
    )
    sweep = services.start_sweep(alice, request)
    run_tick(sweep.pk, "test")
    first, second = Trial.objects.filter(sweep=sweep).order_by("number")
    assert first.state == TrialState.RUNNING and first.job is not None
    assert second.state == TrialState.PENDING and second.job is None
    assert second.reason.startswith("waiting: you already have 1 active jobs")
    # Its job ends (cancelled by its owner): the job's end asks for a tick, which fails that trial and submits the
    # waiting one (the budget's third trial waits in turn).
    lifecycle.request_cancel(first.job)
    assert Sweep.objects.get(pk=sweep.pk).state == "queued"
    run_tick(sweep.pk, "test")
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.state == TrialState.CANCELLED and first.reason == "cancelled before it ran"
    assert second.state == TrialState.RUNNING and second.job is not None and second.reason == ""
    assert Trial.objects.get(sweep=sweep, number=2).state == TrialState.PENDING


def _scripted_run(job: Any, points: list[tuple[int, float]], metric: str) -> None:
    """What a worker records for ``job`` (a scripted worker: the claim, the validation points, the success)."""
    from builder.jobs import lifecycle
    from builder.jobs.models import JobState, MetricPoint

    lease = lifecycle.claim(job.pk, "scripted")
    assert lease is not None and lease.job_id == job.pk
    for seq, (step, value) in enumerate(points, start=1):
        MetricPoint.objects.create(job_id=job.pk, seq=seq, step=step, name=metric, value=value)
    assert lifecycle.transition(job.pk, JobState.SUCCEEDED, token=lease.token, reason="scripted")


@pytest.mark.django_db(transaction=True)
def test_a_classifier_sweep_maximises_accuracy_and_prunes_a_trial_below_the_median(
    no_worker: None, alice: Any, dataset: Dataset, settings: Any
) -> None:
    """Accuracy is better higher: the best completed trial is the most accurate, and a trial whose accuracy falls
    below the median of the completed ones is pruned (its job, still running, is asked to stop with the reason)."""
    from builder.jobs.models import Job
    from builder.sweeps import services
    from builder.sweeps.runner import run_tick

    settings.JOBS_MAX_ACTIVE_PER_USER = 10
    spec = {**TINY, "model": {**TINY["model"], "task": "classification", "num_labels": 2}}
    config = Config.objects.create(owner=alice, name="classifier")
    version = ConfigVersion.objects.create(config=config, number=1, spec=load_spec(spec).model_dump(mode="json"))
    Dataset.objects.filter(pk=dataset.pk).update(label_field="label")
    request = services.SweepRequest(
        name="accuracy", config_version=version.pk, dataset=dataset.pk, space=[LR], budget=3, parallelism=3,
        objective="val_accuracy",
    )  # fmt: skip
    sweep = services.start_sweep(alice, request)
    run_tick(sweep.pk, "test")
    trials = list(Trial.objects.filter(sweep=sweep).select_related("job").order_by("number"))
    assert [t.state for t in trials] == [TrialState.RUNNING] * 3
    jobs = [Job.objects.get(sweep_trial=t) for t in trials]
    _scripted_run(jobs[0], [(10, 0.60), (20, 0.70)], "val_accuracy")
    _scripted_run(jobs[1], [(10, 0.80), (20, 0.90)], "val_accuracy")
    # The third is still training, and far less accurate at step 10 than the median of the two completed.
    from builder.jobs import lifecycle
    from builder.jobs.models import MetricPoint

    third = jobs[2]
    assert lifecycle.claim(third.pk, "scripted") is not None
    MetricPoint.objects.create(job_id=third.pk, seq=1, step=10, name="val_accuracy", value=0.2)
    Sweep.objects.filter(pk=sweep.pk).update(state="queued")  # what beat's poll does for a waiting sweep
    run_tick(sweep.pk, "test")

    done = {t.number: t for t in Trial.objects.filter(sweep=sweep)}
    assert (done[0].state, done[0].objective) == (TrialState.COMPLETE, 0.70)  # the best of its points: the highest
    assert (done[1].state, done[1].objective) == (TrialState.COMPLETE, 0.90)
    assert done[2].state == TrialState.PRUNED and done[2].reason.startswith("pruned at step 10: val_accuracy 0.2")
    assert "below the median" in done[2].reason
    assert Job.objects.get(pk=third.pk).cancel_requested  # the worker stops it within a step
    best = services.best_trial(Sweep.objects.get(pk=sweep.pk))
    assert best is not None and best.number == 1
    assert Sweep.objects.get(pk=sweep.pk).state == "finished"  # the budget is spent and nothing is active
