"""Reports through the real services: a tiny job succeeds, the worker evaluates, exports and times its checkpoint
(the automatic report), every format and artifact downloads, the playground streams tokens over its websocket,
and the outsider gets nothing. Artifacts on S3 download through presigned URLs.
"""

from __future__ import annotations

import io
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import boto3
import jsonschema
import numpy as np
import onnxruntime
import pytest
from django.test import Client, override_settings
from pypdf import PdfReader
from safetensors.numpy import load as load_safetensors
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from builder.datasets.models import Dataset
from builder.reports import runner
from builder.reports.models import Report
from tests.builder.test_jobs import corpus, submit, wait_state  # noqa: F401  (corpus: a fixture)
from tests.builder.test_jobs import dataset as dataset  # a fixture: alice's ready tiny corpus
from tests.conftest import session_cookie, signed_in
from tests.services import Stack, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def wait_report(job_id: int, timeout: float = 240) -> Report:
    def done() -> Report | None:
        report = Report.objects.filter(job_id=job_id).first()
        return report if report is not None and report.state in ("succeeded", "failed") else None

    report: Report = wait_for(done, timeout, f"the report of job {job_id}", interval=0.5)
    return report


def playground_socket(stack: Stack, job_id: int, user: Any, query: str = "") -> ClientConnection:
    url = stack.base_url.replace("http://", "ws://") + f"/ws/playground/{job_id}/{query}"
    return connect(url, additional_headers={"Cookie": session_cookie(user)}, origin=Origin(stack.base_url),
                   open_timeout=10)  # fmt: skip


def receive(ws: ClientConnection, timeout: float = 60) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(ws.recv(timeout=timeout))
    return message


def body(response: Any) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else bytes(response.content)


def test_a_succeeded_job_is_evaluated_on_the_worker_and_its_report_downloads(
    stack: Stack,
    client: Client,
    alice: Any,
    charlie: Any,
    dataset: Dataset,
    artifacts: Path,
) -> None:
    client.force_login(alice)
    job = submit(client, dataset, max_steps=20)
    finished = wait_state(job["id"], {"succeeded", "failed"})
    assert finished.state == "succeeded", finished.error
    began = time.monotonic()
    report = wait_report(job["id"])
    assert report.state == "succeeded", report.error
    timings = report.document["report"]["timings"]
    print(f"report of a 20-step job: ready {time.monotonic() - began:.1f} s after the job; timings {timings}")
    assert report.trigger == "automatic" and report.checkpoint_step == 20 and report.attempts == 1

    # The page: every section, the figures, the checkpoint's hash.
    page = client.get(f"/reports/{report.pk}/").content.decode()
    for section in ("summary", "training", "evaluation", "samples", "routing", "deployment", "artifacts"):
        assert f'data-section="{section}"' in page
    assert page.count("<svg") == 3
    document = report.document
    assert document["checkpoint"]["sha256"] in page
    variants = {v["name"]: v for v in document["deployment"]["variants"]}
    assert set(variants) == {"pytorch_fp32", "pytorch_int8", "onnxruntime_fp32"}
    assert all(row["median_ms"] > 0 for v in variants.values() for row in v["latency"])
    assert len(document["deployment"]["advice"]) == 3 and document["samples"]

    # Every download; the JSON follows its schema; the weights are the checkpoint's; the ONNX model runs.
    api = client.get(f"/api/reports/{report.pk}").json()
    urls = {d["name"]: d["url"] for d in api["downloads"]}
    assert {"report.pdf", "report.json", "report.md", "report.html", "model.safetensors", "tokenizer.json",
            "model.onnx", "spec.json"} <= set(urls)  # fmt: skip
    pdf = body(client.get(urls["report.pdf"]))
    (artifacts / "report-worker.pdf").write_bytes(pdf)
    reader = PdfReader(io.BytesIO(pdf))
    text = "\n".join(p.extract_text() for p in reader.pages)
    assert 2 <= len(reader.pages) <= 8
    for title in ("Summary", "Evaluation", "Routing", "Deployment", "Training curves", "Expert load", "ONNX Runtime"):
        assert title in text
    served = json.loads(body(client.get(urls["report.json"])))
    jsonschema.validate(served, client.get("/api/reports/schema").json())
    assert served["checkpoint"]["sha256"] == document["checkpoint"]["sha256"]
    weights = body(client.get(urls["model.safetensors"]))
    assert served["checkpoint"]["sha256"] == next(a["sha256"] for a in served["artifacts"] if a["name"] ==
                                                  "model.safetensors")  # fmt: skip
    assert "embed.weight" in load_safetensors(weights)
    onnx_path = Path(artifacts) / "report-worker.onnx"
    onnx_path.write_bytes(body(client.get(urls["model.onnx"])))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input_ids": np.array([[1, 2, 3, 4]], dtype=np.int64)})[0]
    assert logits.shape == (1, 4, 260)
    assert json.loads(body(client.get(urls["spec.json"])))["model"]["num_layers"] == 2
    assert client.get(urls[f"job-{job['id']}-tensorboard.tar.gz"]).status_code == 200

    # Asking again returns the same report: one per checkpoint.
    again = client.post(f"/api/jobs/{job['id']}/reports", {}, content_type="application/json")
    assert again.status_code == 200 and again.json()["id"] == report.pk

    # The playground: the model loads once, then a prompt streams back token by token.
    with playground_socket(stack, job["id"], alice) as ws:
        assert receive(ws)["type"] == "loading"
        ready = receive(ws)
        assert ready["type"] == "ready", ready
        assert ready["task"] == "causal_lm" and ready["report"] == report.pk and ready["checkpoint_step"] == 20
        ws.send(json.dumps({"prompt": "the expert", "temperature": "hot"}))
        assert receive(ws) == {"type": "error", "field": "temperature",
                               "message": "temperature must be a number, got 'hot'"}  # fmt: skip
        ws.send("not json")
        assert receive(ws)["type"] == "error"
        ws.send(json.dumps({"prompt": "the expert", "temperature": 0, "max_tokens": 12}))
        assert receive(ws)["type"] == "start"
        pieces = []
        while (message := receive(ws))["type"] == "token":
            pieces.append(message["text"])
        assert (
            message["type"] == "done"
            and message["tokens"] == len(pieces)
            and message["stopped"] in ("eos", "max_tokens")
        )
        assert 1 <= len(pieces) <= 12
        ws.send(json.dumps({"type": "classify", "text": "x"}))
        assert receive(ws)["field"] == "type"

    # The outsider: 404 everywhere, and the socket refuses him.
    outsider = signed_in(charlie)
    for url in [
        f"/reports/{report.pk}/",
        f"/reports/{report.pk}/playground/",
        f"/api/reports/{report.pk}",
        *urls.values(),
    ]:
        assert outsider.get(url).status_code == 404, url
    with pytest.raises(InvalidStatus) as refused:
        playground_socket(stack, job["id"], charlie)
    assert refused.value.response.status_code == 403


@pytest.mark.django_db(transaction=True)
def test_artifacts_on_s3_download_through_presigned_urls(
    moto_s3: str, alice: Any, charlie: Any, tmp_path: Path, monkeypatch: Any, media_root: Path
) -> None:
    """The runner stores a report's files through the storage API; on S3 a download is a redirect to a presigned
    URL of the object (the web process never carries it)."""
    from builder.jobs.models import Job

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "moto-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "moto-test-secret")
    bucket = f"moe-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {"bucket_name": bucket, "endpoint_url": moto_s3, "region_name": "us-east-1",
                    "addressing_style": "path", "file_overwrite": False, "querystring_expire": 60,
                    "signature_version": "s3v4"},
    }  # fmt: skip
    from django.conf import settings

    job = Job.objects.create(owner=alice, name="s3", spec={}, data_source="x", state="succeeded")
    report = Report.objects.create(job=job, checkpoint_step=1, state="succeeded")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 100)
    with override_settings(STORAGES={**settings.STORAGES, "default": s3_storage}, S3_PRESIGNED_URL_SECONDS=60):
        first = runner._store(report, "model.safetensors", weights, "application/octet-stream")
        again = runner._store(report, "model.safetensors", weights, "application/octet-stream")
        assert first["storage"] == again["storage"] == f"reports/job-{job.pk}/report-{report.pk}/model.safetensors"
        Report.objects.filter(pk=report.pk).update(artifacts={"model.safetensors": again})
        owner = signed_in(alice)
        response = owner.get(f"/api/reports/{report.pk}/artifacts/model.safetensors")
        assert response.status_code == 302 and response["Cache-Control"] == "no-store"
        location = response["Location"]
        assert location.startswith(moto_s3) and "X-Amz-Expires=60" in location and "X-Amz-Signature" in location
        with urllib.request.urlopen(location, timeout=30) as fetched:
            assert fetched.read() == weights.read_bytes()
        outsider = signed_in(charlie)
        assert outsider.get(f"/api/reports/{report.pk}/artifacts/model.safetensors").status_code == 404
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [first["storage"]]  # the second store replaced the first object, under the same name


def test_a_report_whose_worker_died_is_taken_over_then_failed_after_its_attempts(stack: Stack, alice: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from builder.jobs.models import Job
    from builder.reports.work import REPORTS

    job = Job.objects.create(
        owner=alice,
        name="gone",
        spec={},
        data_source="gone.txt",
        queue="gpu",
        state="succeeded",
        last_checkpoint_step=20,
    )
    long_ago = timezone.now() - timedelta(hours=2)  # stale for this process and for the worker (30 min default)
    running = {"job": job, "state": "running", "lease_owner": "dead@host:1", "lease_token": 1, "heartbeat_at": long_ago}
    orphan = Report.objects.create(checkpoint_step=20, attempts=1, **running)
    spent = Report.objects.create(checkpoint_step=10, attempts=REPORTS.max_attempts, **running)
    assert sorted(REPORTS.reap()) == sorted([orphan.pk, spent.pk])
    spent.refresh_from_db()
    assert spent.state == "failed" and "stopped answering" in spent.error and spent.finished_at is not None
    # The orphan was sent again: the real worker takes it over (a second attempt, by another worker) and ends it
    # (failed here: its job's folder, with the checkpoint, does not exist).
    taken: Report = wait_for(
        lambda: (r := Report.objects.get(pk=orphan.pk)).state in ("succeeded", "failed") and r, 120, "the takeover"
    )
    assert taken.attempts == 2 and taken.lease_owner != "dead@host:1" and taken.lease_token == 2
    assert REPORTS.reap() == []
