"""The audit log: sign-in (success and failure), token issue, job launch, downloads and deletions are each recorded
with who, what, which object, when and from where; the owner sees them (a page in the navigation, and the API);
charlie, the outsider, sees nothing of alice's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.test import Client
from rest_framework.test import APIClient

from builder.accounts.models import AuditEvent
from builder.configs.models import Config
from builder.datasets.models import Dataset
from builder.jobs.files import job_layout
from builder.jobs.models import Job
from builder.reports.models import Report
from tests.conftest import signed_in

pytestmark = pytest.mark.django_db

SPEC: dict[str, Any] = {
    "model": {
        "vocab_size": 260, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "max_seq_len": 32,
        "moe": {"num_routed_experts": 4, "top_k": 2, "expert_hidden_size": 32},
    },
    "training": {"batch_size": 4, "max_steps": 10, "schedule": {"warmup_steps": 2}},
    "data": {"tokenizer": "bytes", "seq_len": 32},
}  # fmt: skip


def events(client: Client) -> list[dict[str, Any]]:
    response = client.get("/api/audit")
    assert response.status_code == 200
    result: list[dict[str, Any]] = response.json()
    return result


def kinds(rows: list[dict[str, Any]]) -> list[tuple[str, str, int | None]]:
    """(action, object type, object id) of each event, oldest first."""
    return [(e["action"], e["object_type"], e["object_id"]) for e in reversed(rows)]


def ready_dataset(owner: Any, name: str = "corpus") -> Dataset:
    stored = default_storage.save(f"datasets/test/{name}.txt", ContentFile(b"one document\n\nanother one\n"))
    return Dataset.objects.create(owner=owner, name=name, format="txt", file_name=stored, size_bytes=26, state="ready")


def test_sign_ins_and_tokens_are_recorded_with_the_address(alice: Any, charlie: Any) -> None:
    browser = Client(REMOTE_ADDR="192.0.2.10")
    assert browser.post("/accounts/login/", {"username": "alice", "password": "guess"}).status_code == 200
    assert browser.post("/accounts/login/", {"username": "alice", "password": alice.raw_password}).status_code == 302
    api = APIClient(REMOTE_ADDR="192.0.2.11")
    assert api.post("/api/auth/token", {"username": "alice", "password": alice.raw_password}).status_code == 200
    mine = events(signed_in(alice))
    assert [(e["action"], e["actor"], e["actor_name"], e["ip"]) for e in reversed(mine)][:3] == [
        ("sign_in_failed", None, "alice", "192.0.2.10"),  # alice sees the attempt on her account, and from where
        ("sign_in", "alice", "alice", "192.0.2.10"),
        ("token_issued", "alice", "alice", "192.0.2.11"),
    ]
    assert all(e["owner"] == "alice" for e in mine)
    # Charlie's log has his own sign-in (signed_in) and nothing of alice's.
    theirs = events(signed_in(charlie))
    assert {e["action"] for e in theirs} == {"sign_in"} and all(e["actor"] == "charlie" for e in theirs)


def test_launches_downloads_and_deletions_are_recorded_and_only_their_people_see_them(
    alice: Any, bob: Any, charlie: Any, media_root: Path
) -> None:
    client = signed_in(alice, APIClient)
    page = signed_in(alice)
    dataset = ready_dataset(alice)
    # Job launches, through the API and the form.
    launched = client.post("/api/jobs", {"name": "a", "spec": SPEC, "dataset": dataset.pk}, format="json")
    assert launched.status_code == 201
    config = client.post("/api/configs", {"name": "c", "spec": SPEC}, format="json").json()
    form = page.post(
        "/jobs/new/",
        {"config_version": Config.objects.get(pk=config["id"]).latest.pk, "dataset": dataset.pk, "queue": "cpu"},
    )
    assert form.status_code == 302, form.content[:2000]
    job = Job.objects.get(pk=launched.json()["id"])
    second = Job.objects.exclude(pk=job.pk).get(owner=alice)
    # Downloads: the dataset (API and page), the metrics CSV, TensorBoard, a report's file and an artifact.
    assert client.get(f"/api/datasets/{dataset.pk}/download").status_code == 200
    assert page.get(f"/datasets/{dataset.pk}/download/data").status_code == 200
    assert client.get(f"/api/jobs/{job.pk}/metrics.csv").status_code == 200
    (job_layout(job.pk).tensorboard).mkdir(parents=True, exist_ok=True)
    (job_layout(job.pk).tensorboard / "events.out").write_bytes(b"x")
    assert client.get(f"/api/jobs/{job.pk}/tensorboard.tar.gz").status_code == 200
    stored = default_storage.save("reports/test/report.json", ContentFile(b"{}"))
    report = Report.objects.create(
        job=job, checkpoint_step=10, state="succeeded",
        artifacts={name: {"storage": stored} for name in ("report.json", "spec.json")},
    )  # fmt: skip
    assert client.get(f"/api/reports/{report.pk}/report.json").status_code == 200
    assert client.get(f"/api/reports/{report.pk}/artifacts/spec.json").status_code == 200
    # Bob, whom the job is shared with, downloads its metrics: his event, and alice's (she owns the job).
    job.shared_with.add(bob)
    bobs = signed_in(bob, APIClient)
    assert bobs.get(f"/api/jobs/{job.pk}/metrics.csv").status_code == 200
    # Charlie cannot download any of it: nothing is recorded for what was refused.
    outsider = signed_in(charlie, APIClient)
    assert outsider.get(f"/api/jobs/{job.pk}/metrics.csv").status_code == 404
    assert outsider.get(f"/api/datasets/{dataset.pk}/download").status_code == 404
    assert outsider.delete(f"/api/configs/{config['id']}").status_code == 404
    # Deletions: a dataset and a config through the API, another of each through the pages.
    spare = ready_dataset(alice, "spare")
    other = client.post("/api/configs", {"name": "other", "spec": SPEC}, format="json").json()
    assert client.delete(f"/api/datasets/{spare.pk}").status_code == 204
    assert client.delete(f"/api/configs/{other['id']}").status_code == 204
    unused = ready_dataset(alice, "unused")
    assert page.post(f"/datasets/{unused.pk}/delete").status_code == 302
    assert page.post(f"/configure/{config['id']}/delete/").status_code == 302

    mine = [e for e in events(page) if e["action"] != "sign_in"]
    assert kinds(mine) == [
        ("job_launched", "job", job.pk),
        ("job_launched", "job", second.pk),
        ("download", "dataset", dataset.pk),
        ("download", "dataset", dataset.pk),
        ("download", "job", job.pk),
        ("download", "job", job.pk),
        ("download", "report", report.pk),
        ("download", "report", report.pk),
        ("download", "job", job.pk),  # bob's
        ("deletion", "dataset", spare.pk),
        ("deletion", "config", other["id"]),
        ("deletion", "dataset", unused.pk),
        ("deletion", "config", config["id"]),
    ]
    details = [e["detail"] for e in reversed(mine)]
    assert details[2:9] == [
        {"part": "data"}, {"part": "data"}, {"file": "metrics.csv"}, {"file": "tensorboard.tar.gz"},
        {"file": "report.json"}, {"file": "spec.json"}, {"file": "metrics.csv"},
    ]  # fmt: skip
    assert [e["object_name"] for e in reversed(mine)][-4:] == ["spare", "other", "unused", "c"]
    by_bob = mine[4]
    assert (by_bob["actor"], by_bob["owner"], by_bob["ip"]) == ("bob", "alice", None)  # bob's address is his
    assert all(e["ip"] == "127.0.0.1" for e in mine if e["actor"] == "alice")
    assert kinds([e for e in events(signed_in(bob)) if e["action"] != "sign_in"]) == [("download", "job", job.pk)]
    # Charlie sees nothing of alice's or bob's, in the API or on the page.
    assert all(e["actor"] == "charlie" and e["action"] == "sign_in" for e in events(signed_in(charlie)))
    activity = signed_in(charlie).get("/accounts/activity/").content.decode()
    assert 'data-event="download"' not in activity and 'data-event="deletion"' not in activity
    assert AuditEvent.objects.filter(actor=charlie).exclude(action="sign_in").count() == 0


def test_the_activity_page_lists_the_owners_events_and_is_in_the_navigation(alice: Any) -> None:
    page = signed_in(alice)
    assert page.post("/accounts/logout/").status_code == 302
    Client().post("/accounts/login/", {"username": "alice", "password": "wrong"})
    page = signed_in(alice)
    home = page.get("/").content.decode()
    assert 'href="/accounts/activity/"' in home
    activity = page.get("/accounts/activity/")
    assert activity.status_code == 200
    text = activity.content.decode()
    assert 'data-event="sign_in_failed"' in text and "(not signed in)" in text and 'data-event="sign_in"' in text
    assert Client().get("/accounts/activity/").status_code == 302  # signed out: to the sign-in page
    assert APIClient().get("/api/audit").status_code == 401
