"""S3 round trip against moto's server on loopback: upload, validate, clean, presigned download, then training
reads the cleaned data through the storage API and its checkpoint is written back.

The web server and the worker of this test run with ``S3_BUCKET`` set (their own Redis, so that no other test's
task reaches a worker with another storage); the test process switches its own storage to the same bucket for
the training part.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import torch
from django.test import override_settings
from rest_framework.authtoken.models import Token

from builder.datasets import storage
from builder.datasets.models import Dataset, DatasetState
from tests.services import Stack, service_env, shared_database_url, start_asgi, start_redis, start_worker, wait_for
from tests.services import wait_worker_ready as wait_ready
from workers.engine.checkpoint import latest_checkpoint, verify_checkpoint
from workers.engine.sinks import MemorySink
from workers.engine.spec import Spec
from workers.engine.train import train

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "moto-test", "AWS_SECRET_ACCESS_KEY": "moto-test-secret"}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # let the test see the 302 itself


def _http(base: str, token: str, method: str, path: str, body: bytes | None = None, ctype: str = "") -> Any:
    request = urllib.request.Request(f"{base}{path}", data=body, method=method)
    request.add_header("Authorization", f"Token {token}")
    if ctype:
        request.add_header("Content-Type", ctype)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


@pytest.fixture
def s3_stack(moto_s3: str, stack: Stack, tmp_path: Path) -> Iterator[tuple[str, str, Any]]:
    """(base URL of a web server on S3, bucket, boto3 client); the worker behind it uses S3 too."""
    bucket = f"moe-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1", **_boto_credentials())
    client.create_bucket(Bucket=bucket)
    redis_service, url = start_redis(tmp_path / "redis")
    env = service_env(
        url,
        shared_database_url(),
        Path(stack.env["MEDIA_ROOT"]),
        S3_BUCKET=bucket,
        S3_ENDPOINT_URL=moto_s3,
        S3_ADDRESSING_STYLE="path",
        S3_PRESIGNED_URL_SECONDS="60",
        **CREDENTIALS,
    )
    worker = asgi = None
    try:
        worker = start_worker(env, tmp_path, "s3")
        asgi, base = start_asgi(env, tmp_path)
        wait_ready(worker, url)
        yield base, bucket, client
    finally:
        for service in (asgi, worker, redis_service):
            if service is not None:
                service.stop()


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


def _settle(dataset_id: int) -> Dataset:
    def done() -> Dataset | None:
        dataset = Dataset.objects.get(pk=dataset_id)
        return None if dataset.is_busy else dataset

    result: Dataset = wait_for(done, 90, f"the S3 worker to finish dataset {dataset_id}", interval=0.2)
    return result


def _corpus() -> bytes:
    rng = random.Random(5)
    letters = "abcdefghijklmnop"
    rows = []
    for i in range(80):
        rows.append({"text": "".join(rng.choice(letters) for _ in range(60)), "label": i % 2})
    rows += rows[:10]  # exact duplicates for the cleaning to remove
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_s3_round_trip(
    stack: Stack, s3_stack: tuple[str, str, Any], alice: Any, charlie: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    base, bucket, s3 = s3_stack
    token = Token.objects.create(user=alice).key
    data = _corpus()

    # Upload in two chunks through the web server; the file lands in the bucket.
    start = json.dumps({"filename": "letters.jsonl", "size": len(data), "label_field": "label"}).encode()
    status, _, body = _http(base, token, "POST", "/api/datasets/uploads", start, "application/json")
    assert status == 201, body
    session = json.loads(body)
    half = len(data) // 2
    for offset, chunk in ((0, data[:half]), (half, data[half:])):
        url = f"{session['upload_url']}?offset={offset}"
        status, _, body = _http(base, token, "PUT", url, chunk, "application/octet-stream")
        assert status == 200, body
    status, _, body = _http(base, token, "POST", f"{session['upload_url']}/complete")
    assert status == 202, body
    source = _settle(json.loads(body)["id"])
    assert source.state == DatasetState.READY, source.error_message
    assert source.stats["examples"] == 90 and source.stats["duplicates"] == 10
    stored = s3.get_object(Bucket=bucket, Key=source.file_name)
    assert stored["Body"].read() == data and stored["ContentType"] == "application/jsonl"
    assert not (Path(stack.env["MEDIA_ROOT"]) / source.file_name).exists()  # in the bucket, not on local disk

    # Clean on the worker, which reads the object from S3 and writes the new version back.
    options = json.dumps({"val_fraction": 0.25, "seed": 3}).encode()
    status, _, body = _http(base, token, "POST", f"/api/datasets/{source.pk}/clean", options, "application/json")
    assert status == 202, body
    version = _settle(json.loads(body)["id"])
    assert version.state == DatasetState.READY, version.error_message
    assert version.cleaning_report["removed"]["exact_duplicate"] == 10
    assert version.stats["splits"] == {"train": 60, "validation": 20}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {source.file_name, version.file_name, version.validation_file_name} <= keys

    # Downloads are redirects to presigned URLs that expire after S3_PRESIGNED_URL_SECONDS.
    status, headers, _ = _http(base, token, "GET", f"/api/datasets/{version.pk}/download?part=train")
    assert status == 302
    location = headers["Location"]
    query = parse_qs(urlsplit(location).query)
    assert location.startswith(s3.meta.endpoint_url) and query["X-Amz-Expires"] == ["60"]
    assert "X-Amz-Signature" in query and "attachment" in query["response-content-disposition"][0]
    with urllib.request.urlopen(location, timeout=30) as response:
        train_bytes = response.read()
    assert train_bytes == s3.get_object(Bucket=bucket, Key=version.file_name)["Body"].read()
    assert len(train_bytes.splitlines()) == 60
    outsider = Token.objects.create(user=charlie).key
    assert _http(base, outsider, "GET", f"/api/datasets/{version.pk}/download?part=train")[0] == 404

    # Training reads the cleaned data through the storage API and writes its checkpoint back to the bucket.
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    s3_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": bucket,
            "endpoint_url": s3.meta.endpoint_url,
            "region_name": "us-east-1",
            "addressing_style": "path",
            "file_overwrite": False,
        },
    }
    spec = Spec.model_validate(
        {
            "model": {
                "vocab_size": 259, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_seq_len": 32,
                "moe": {"num_routed_experts": 4, "top_k": 2, "expert_hidden_size": 32},
            },
            "data": {"tokenizer": "bytes", "seq_len": 32, "val_fraction": 0.1},
            "training": {
                "max_steps": 4, "batch_size": 4, "log_interval": 1, "eval_interval": 2, "eval_batches": 1,
                "checkpoint_interval": 2, "seed": 1, "schedule": {"warmup_steps": 1},
            },
        }
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with override_settings(STORAGES={**_current_storages(), "default": s3_storage}):
            assert not storage.is_local()
            with storage.local_copy(version.file_name) as local:
                assert local.read_bytes() == train_bytes  # a streamed copy of the object
                sink = MemorySink()
                result = train(spec, local, tmp_path / "run", sink, device="cpu")
            assert result.status == "completed" and result.step == 4
            checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
            assert checkpoint is not None
            verify_checkpoint(checkpoint)
            written = {}
            for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
                key = f"artifacts/s3-round-trip/{checkpoint.name}/{path.relative_to(checkpoint)}"
                written[storage.save_local_file(key, path)] = path.read_bytes()
    finally:
        torch.set_num_threads(threads)
    assert written
    for key, content in written.items():
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == content
    assert len(sink.series("loss")) >= 4


def _current_storages() -> dict[str, Any]:
    from django.conf import settings

    return dict(settings.STORAGES)
