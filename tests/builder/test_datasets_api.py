"""The datasets API and pages against the real worker: chunked uploads, validation, cleaning, refusals, outsiders.

Requests go through Django's test client in this process; validation and cleaning run in the session's real
Celery worker, which shares the database file and the storage folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client, override_settings

from builder.datasets.models import Dataset, DatasetState, UploadSession
from tests.conftest import signed_in
from tests.services import Stack, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

CSV = (
    "review,stars\n"
    "Great little kettle,5\n"
    '"Broke after a week, ""never again""",1\n'
    "Does what it says,4\n"
    "Great little kettle,5\n"
    "Too loud,2\n"
)


def _settle(dataset_id: int, timeout: float = 60) -> Dataset:
    """Wait until the worker has finished with the dataset; returns it."""

    def done() -> Dataset | None:
        dataset = Dataset.objects.get(pk=dataset_id)
        return None if dataset.is_busy else dataset

    result: Dataset = wait_for(done, timeout, f"the worker to finish dataset {dataset_id}", interval=0.2)
    return result


def _start(client: Client, **body: Any) -> Any:
    return client.post("/api/datasets/uploads", json.dumps(body), content_type="application/json")


def _put(client: Client, session_id: str, offset: int, chunk: bytes) -> Any:
    return client.put(
        f"/api/datasets/uploads/{session_id}?offset={offset}", chunk, content_type="application/octet-stream"
    )


def test_chunked_upload_resumes_and_the_worker_describes_it(stack: Stack, alice: Any, charlie: Any) -> None:
    client = signed_in(alice)
    data = CSV.encode()
    started = _start(client, filename="reviews.csv", size=len(data), text_field="review", label_field="stars")
    assert started.status_code == 201, started.content
    session = started.json()
    assert session["received"] == 0 and session["format"] == "csv" and session["chunk_size"] >= 64 * 1024

    assert _put(client, session["id"], 0, data[:40]).json()["received"] == 40
    # A chunk sent to the wrong offset is refused with the offset to resume from.
    wrong = _put(client, session["id"], 10, data[10:60])
    assert wrong.status_code == 409 and wrong.json()["received"] == 40 and "offset" in wrong.json()
    # Completing early is refused too.
    assert client.post(f"/api/datasets/uploads/{session['id']}/complete").status_code == 409
    # A retried chunk (its response was lost) is written at its offset, not appended.
    assert _put(client, session["id"], 40, data[40:70]).status_code == 200
    assert client.get(f"/api/datasets/uploads/{session['id']}").json()["received"] == 70
    assert _put(client, session["id"], 70, data[70:]).json()["received"] == len(data)

    done = client.post(f"/api/datasets/uploads/{session['id']}/complete")
    assert done.status_code == 202, done.content
    dataset = _settle(done.json()["id"])
    assert dataset.state == DatasetState.READY, dataset.error_message
    assert dataset.stats["examples"] == 5 and dataset.stats["duplicates"] == 1
    assert {c["label"]: c["count"] for c in dataset.stats["labels"]["counts"]} == {"5": 2, "1": 1, "4": 1, "2": 1}
    assert not UploadSession.objects.get(pk=session["id"]).is_open

    detail = client.get(f"/api/datasets/{dataset.pk}").json()
    assert (
        detail["state"] == "ready"
        and detail["owner"] == "alice"
        and detail["downloads"] == {"data": f"/api/datasets/{dataset.pk}/download?part=data"}
    )
    download = client.get(detail["downloads"]["data"])
    assert download.status_code == 200 and download.getvalue() == data
    assert 'filename="reviews.csv"' in download["Content-Disposition"]
    page = client.get(f"/datasets/{dataset.pk}/")
    assert page.status_code == 200
    for marker in (b'data-testid="length-histogram"', b'data-testid="label-chart"', b"Does what it says"):
        assert marker in page.content
    assert client.get(f"/datasets/{dataset.pk}/status?shown=ready").get("HX-Refresh") is None

    # Charlie, the outsider, cannot tell that any of it exists.
    outsider = signed_in(charlie)
    sid = session["id"]
    for method, url in [
        ("get", f"/api/datasets/{dataset.pk}"),
        ("patch", f"/api/datasets/{dataset.pk}"),
        ("delete", f"/api/datasets/{dataset.pk}"),
        ("post", f"/api/datasets/{dataset.pk}/clean"),
        ("post", f"/api/datasets/{dataset.pk}/analyze"),
        ("get", f"/api/datasets/{dataset.pk}/download"),
        ("get", f"/api/datasets/uploads/{sid}"),
        ("put", f"/api/datasets/uploads/{sid}?offset=0"),
        ("delete", f"/api/datasets/uploads/{sid}"),
        ("post", f"/api/datasets/uploads/{sid}/complete"),
        ("get", f"/datasets/{dataset.pk}/"),
        ("get", f"/datasets/{dataset.pk}/status"),
        ("get", f"/datasets/{dataset.pk}/download/data"),
        ("post", f"/datasets/{dataset.pk}/clean"),
        ("post", f"/datasets/{dataset.pk}/analyze"),
        ("post", f"/datasets/{dataset.pk}/fields"),
        ("post", f"/datasets/{dataset.pk}/delete"),
    ]:
        response = getattr(outsider, method)(url, content_type="application/json")
        assert response.status_code == 404, (method, url, response.status_code)
    assert all(d["id"] != dataset.pk for d in outsider.get("/api/datasets").json())
    assert b"Great little kettle" not in outsider.get("/datasets/").content
    assert Dataset.objects.filter(pk=dataset.pk, state=DatasetState.READY).exists()


def test_a_malformed_upload_names_its_line_and_can_be_read_with_other_fields(stack: Stack, alice: Any) -> None:
    client = signed_in(alice)
    upload = client.post(
        "/api/datasets",
        {"file": _named(b'{"body": "first"}\n{"body": "second", "topic": "x"}\n', "notes.jsonl")},
    )
    assert upload.status_code == 202, upload.content
    dataset = _settle(upload.json()["id"])
    assert dataset.state == DatasetState.INVALID
    error = client.get(f"/api/datasets/{dataset.pk}").json()["error"]
    assert error == {"line": 1, "message": "missing field 'text' (fields: body)"}
    page = client.get(f"/datasets/{dataset.pk}/")
    assert b"line 1" in page.content and b"Validate again" in page.content

    # The person picks the right field; validation runs again and succeeds.
    fixed = client.patch(f"/api/datasets/{dataset.pk}", {"text_field": "body"}, content_type="application/json")
    assert fixed.status_code == 200 and fixed.json()["state"] == "queued"
    dataset = _settle(dataset.pk)
    assert dataset.state == DatasetState.READY and dataset.stats["examples"] == 2


def test_cleaning_through_the_api(stack: Stack, alice: Any, charlie: Any) -> None:
    client = signed_in(alice)
    text = "\n\n".join(["the same paragraph", "the same paragraph", "a different one", "tiny", "yet another text"])
    upload = client.post("/api/datasets", {"file": _named(text.encode(), "notes.txt")})
    source = _settle(upload.json()["id"])
    assert source.state == DatasetState.READY and source.stats["examples"] == 5

    bad = client.post(
        f"/api/datasets/{source.pk}/clean",
        json.dumps({"min_chars": 0, "bogus": 1, "val_fraction": 0.9}),
        content_type="application/json",
    )
    assert bad.status_code == 400 and set(bad.json()) == {"min_chars", "bogus", "val_fraction"}

    started = client.post(
        f"/api/datasets/{source.pk}/clean",
        json.dumps({"min_chars": 5, "val_fraction": 0.34, "seed": 1, "name": "notes, cleaned"}),
        content_type="application/json",
    )
    assert started.status_code == 202, started.content
    version = _settle(started.json()["id"])
    assert version.state == DatasetState.READY, version.error_message
    assert version.name == "notes, cleaned" and version.parent_id == source.pk and version.owner_id == alice.pk
    report = version.cleaning_report
    assert report["removed"]["exact_duplicate"] == 1 and report["removed"]["too_short"] == 1 and report["kept"] == 3
    assert version.stats["splits"] == {"train": 2, "validation": 1}
    validation = client.get(f"/api/datasets/{version.pk}/download?part=validation")
    assert len(validation.getvalue().splitlines()) == 1
    assert client.get(f"/api/datasets/{version.pk}/download?part=nope").status_code == 404
    page = client.get(f"/datasets/{version.pk}/")
    assert b'data-testid="cleaning-report"' in page.content and b"Exact duplicate" in page.content
    assert signed_in(charlie).get(f"/api/datasets/{version.pk}").status_code == 404

    assert client.delete(f"/api/datasets/{version.pk}").status_code == 204
    assert not Dataset.objects.filter(pk=version.pk).exists()


def _named(content: bytes, name: str) -> Any:
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, content, content_type="application/octet-stream")


def test_refusals_name_the_field(stack: Stack, alice: Any, media_root: Path) -> None:
    client = signed_in(alice)
    assert _start(client, size=10).json() == {"filename": ["This field is required."]}
    assert set(_start(client, filename="a.jsonl", size=-1).json()) == {"size"}
    too_big = _start(client, filename="a.jsonl", size=3 * 1024**3)
    assert too_big.status_code == 413 and set(too_big.json()) == {"size"}
    assert set(_start(client, filename="data.bin", size=10).json()) == {"format"}
    # A name without a known extension is never looked up on the server's disk (the repository has a Makefile).
    assert set(_start(client, filename="Makefile", size=10).json()) == {"format"}
    named = _start(client, filename="Makefile", size=10, format="txt")
    assert named.status_code == 201 and named.json()["format"] == "txt"
    assert client.delete(f"/api/datasets/uploads/{named.json()['id']}").status_code == 204
    assert set(_start(client, filename="a.txt", size=10, label_field="label").json()) == {"label_field"}
    assert set(_start(client, filename="a.csv", size=10, text_field="").json()) == {"text_field"}
    assert set(_start(client, filename="a.csv", size=10, text_field="x", label_field="x").json()) == {"label_field"}

    with override_settings(DATASET_QUOTA_BYTES=1000, DATASET_UPLOAD_CHUNK_BYTES=100):
        first = _start(client, filename="a.jsonl", size=600).json()
        quota = _start(client, filename="b.jsonl", size=600)
        assert quota.status_code == 413 and "storage quota exceeded" in quota.json()["size"][0]
        assert quota.json()["free_bytes"] == 400
        assert client.get("/api/datasets/quota").json()["used_bytes"] == 600
        assert _put(client, first["id"], 0, b"x" * 101).status_code == 413  # over the chunk size
        assert set(_put(client, first["id"], 0, b"").json()) == {"detail"}
        missing_offset = client.put(
            f"/api/datasets/uploads/{first['id']}", b"x", content_type="application/octet-stream"
        )
        assert missing_offset.json() == {"offset": ["a byte offset (a non-negative integer) is required"]}
        assert client.delete(f"/api/datasets/uploads/{first['id']}").status_code == 204  # frees the reservation
        assert _start(client, filename="b.jsonl", size=600).status_code == 201
        small = _start(client, filename="c.jsonl", size=5).json()
        assert _put(client, small["id"], 0, b"123456").status_code == 422  # past the declared size

    with override_settings(DATASET_SIMPLE_UPLOAD_MAX_BYTES=10):
        big = client.post("/api/datasets", {"file": _named(b"x" * 100, "a.txt")})
        assert big.status_code == 413 and set(big.json()) == {"file"}
    assert set(client.post("/api/datasets", {}).json()) == {"file"}
