"""Hosts that share nothing but the database, Redis and object storage (S3: moto's server on loopback).

Two workers and a web server, each with folders of its own (work folder, media, var). A job starts on one
worker, which is killed (SIGKILL to its process group: the host is gone) after a checkpoint; the other worker
resumes it from the checkpoint in storage and finishes it, and builds its report; the web server serves the
playground and the TensorBoard download from storage. No API answer shows a server folder. The test prints how
long the job took to run again on the other host, and to finish, after the kill.
"""

from __future__ import annotations

import io
import json
import signal
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from django.test import override_settings
from rest_framework.authtoken.models import Token
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from websockets.sync.client import connect
from websockets.typing import Origin

from builder.datasets.models import Dataset
from builder.jobs import lifecycle, remote
from builder.jobs.files import claim_folder
from builder.jobs.models import Job, JobEvent, MetricPoint
from builder.reports.models import Report
from tests.builder.test_jobs import CORPUS, tiny_spec
from tests.conftest import session_cookie
from tests.services import (
    Service,
    service_env,
    shared_db_path,
    start_asgi,
    start_beat,
    start_redis,
    start_worker,
    wait_for,
    wait_worker_ready,
)
from workers.engine.checkpoint import latest_checkpoint, save_checkpoint
from workers.engine.model import build_model
from workers.engine.sinks import JsonlSink, TensorBoardSink, latest_points, read_jsonl
from workers.engine.spec import Spec

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "moto-test", "AWS_SECRET_ACCESS_KEY": "moto-test-secret"}
STEPS = 40


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the test looks at the redirect itself


def _http(base: str, token: str, method: str, path: str, body: bytes | None = None) -> tuple[int, Any, bytes]:
    request = urllib.request.Request(f"{base}{path}", data=body, method=method)
    request.add_header("Authorization", f"Token {token}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


class Hosts:
    """The three hosts' folders and services."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.services: list[Service] = []
        self.workers: dict[str, Service] = {}

    def folders(self, host: str) -> dict[str, str]:
        base = self.root / host
        return {"JOBS_WORK_DIR": str(base / "jobs"), "VAR_DIR": str(base / "var"), "MEDIA_ROOT": str(base / "media")}

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


@pytest.fixture
def bucket(moto_s3: str) -> tuple[str, Any]:
    name = f"moe-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=moto_s3,
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=name)
    return name, client


@pytest.fixture
def hosts(moto_s3: str, bucket: tuple[str, Any], tmp_path: Path) -> Iterator[tuple[Hosts, str, str]]:
    """Worker hosts ``hosta`` and ``hostb``, and ``web`` (the ASGI server and beat); yields them, the web
    server's URL and Redis's."""
    redis_service, url = start_redis(tmp_path / "redis")
    hosts = Hosts(tmp_path)
    hosts.services.append(redis_service)

    def env(host: str) -> dict[str, str]:
        folders = hosts.folders(host)
        return service_env(
            url,
            shared_db_path(),
            Path(folders.pop("MEDIA_ROOT")),
            **folders,
            S3_BUCKET=bucket[0],
            S3_ENDPOINT_URL=moto_s3,
            S3_ADDRESSING_STYLE="path",
            JOB_HEARTBEAT_SECONDS="1",
            JOB_LEASE_SECONDS="4",
            JOB_REAPER_INTERVAL_SECONDS="1",
            REPORT_MAX_EXAMPLES="16",  # a small report: this test is about where it runs, not what it says
            REPORT_PROMPTS="2",
            REPORT_MAX_NEW_TOKENS="8",
            **CREDENTIALS,
        )

    try:
        for host in ("hosta", "hostb"):
            hosts.workers[host] = start_worker(env(host), tmp_path / host, host, concurrency=1)
            hosts.services.append(hosts.workers[host])
        hosts.services.append(start_beat(env("web"), tmp_path / "web"))
        asgi, base = start_asgi(env("web"), tmp_path / "web")
        hosts.services.append(asgi)
        for worker in hosts.workers.values():
            wait_worker_ready(worker, url)
        yield hosts, base, url
    finally:
        hosts.stop()


def _job(job_id: int) -> Job:
    return Job.objects.get(pk=job_id)


def test_a_job_killed_on_one_host_resumes_on_another_from_storage_and_the_web_serves_it_from_there(
    hosts: tuple[Hosts, str, str], bucket: tuple[str, Any], alice: Any, charlie: Any, tmp_path: Path
) -> None:
    group, base, _ = hosts
    bucket_name, s3 = bucket
    s3.put_object(Bucket=bucket_name, Key="datasets/test/corpus.txt", Body=CORPUS.encode(), ContentType="text/plain")
    dataset = Dataset.objects.create(
        owner=alice, name="corpus", format="txt", file_name="datasets/test/corpus.txt", size_bytes=len(CORPUS),
        state="ready",
    )  # fmt: skip
    token = Token.objects.create(user=alice).key
    body = {"name": "roaming", "spec": tiny_spec(STEPS, checkpoint_interval=5), "dataset": dataset.pk, "queue": "gpu"}
    status, _, answer = _http(base, token, "POST", "/api/jobs", json.dumps(body).encode())
    assert status == 201, answer
    job_id = json.loads(answer)["id"]

    # Whichever worker took the job is the host that goes away.
    running = wait_for(
        lambda: (j := _job(job_id)).state == "running" and (j.last_checkpoint_step or 0) >= 5 and j,
        120,
        "the job to run and store a checkpoint",
        interval=0.1,
    )
    first = running.lease_owner.split("@")[0]
    second = "hostb" if first == "hosta" else "hosta"
    stored_at_kill = running.last_checkpoint_step
    # The checkpoint the database names was stored first (or a later one already, which prunes older ones).
    prefix = f"jobs/job-{job_id}/run/checkpoints/"
    stored_steps = [int(k.split("/")[0][5:]) for k in _keys(s3, bucket_name, prefix) if k.endswith("/manifest.json")]
    assert stored_steps and max(stored_steps) >= stored_at_kill
    group.workers[first].stop(sig=signal.SIGKILL)  # the whole process group: no checkpoint on the way out
    killed = time.monotonic()

    resumed = wait_for(
        lambda: (j := _job(job_id)).state == "running" and j.lease_owner.startswith(second) and j,
        120,
        f"the job to run on {second}",
        interval=0.1,
    )
    resumed_after = time.monotonic() - killed
    done = wait_for(lambda: (j := _job(job_id)).state in ("succeeded", "failed") and j, 180, "the job to end")
    finished_after = time.monotonic() - killed
    print(
        f"\nresume on another host: running again {resumed_after:.1f} s after the kill (lease "
        f"4 s, reaper every 1 s), finished {finished_after:.1f} s after it; {STEPS} steps, resumed at step "
        f"{JobEvent.objects.get(job_id=job_id, kind='resume').step}"
    )
    assert done.state == "succeeded", done.error
    assert resumed.attempts == 2 and done.result["checkpoint_step"] == STEPS
    # Every checkpoint the database recorded was stored first (the time it took rides on its event).
    stored = [e.data.get("stored_seconds") for e in JobEvent.objects.filter(job_id=job_id, kind="checkpoint")]
    assert stored and None not in stored
    print(f"storing a checkpoint (tiny model) took {min(stored):.2f}-{max(stored):.2f} s, {len(stored)} checkpoints")

    # The second host had nothing of the job: it fetched the checkpoint from storage and continued from it.
    resume = JobEvent.objects.get(job_id=job_id, kind="resume")
    assert resume.step >= stored_at_kill
    assert (
        f"job {job_id}: fetched the checkpoint of step {resume.step} from storage"
        in Path(group.workers[second].log_path).read_text()
    )
    losses = Counter(MetricPoint.objects.filter(job_id=job_id, name="loss").values_list("step", flat=True))
    assert sorted(losses) == list(range(1, STEPS + 1)) and set(losses.values()) == {1}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket_name, Prefix=f"jobs/job-{job_id}/")["Contents"]}
    assert f"jobs/job-{job_id}/run/checkpoints/step-{STEPS:06d}/manifest.json" in keys
    assert f"jobs/job-{job_id}/run/data/COMPLETE" in keys and f"jobs/job-{job_id}/run/metrics.jsonl" in keys
    # Storage keeps the checkpoints the worker keeps (training.keep_checkpoints, 2 by default).
    assert len({k.split("/")[4] for k in keys if "/checkpoints/" in k}) == 2

    # The report is built on the host still up, from the stored checkpoint.
    report: Report = wait_for(
        lambda: Report.objects.filter(job_id=job_id, state__in=("succeeded", "failed")).first(),
        240,
        "the report",
        interval=0.5,
    )
    assert report.state == "succeeded", report.error
    assert report.checkpoint_step == STEPS and report.lease_owner.startswith(second)

    # The web server (a third folder) streams the TensorBoard logs from storage: every step once, from both hosts.
    status, headers, archive = _http(base, token, "GET", f"/api/jobs/{job_id}/tensorboard.tar.gz")
    assert status == 200 and headers["Content-Type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(tmp_path / "tensorboard", filter="data")
    events = EventAccumulator(str(tmp_path / "tensorboard" / f"job-{job_id}-tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, STEPS + 1))
    outsider = Token.objects.create(user=charlie).key
    assert _http(base, outsider, "GET", f"/api/jobs/{job_id}/tensorboard.tar.gz")[0] == 404

    # The playground on the web server loads the stored checkpoint and generates.
    web = base.replace("http://", "ws://")
    with connect(
        f"{web}/ws/playground/{job_id}/", additional_headers={"Cookie": session_cookie(alice)},
        origin=Origin(base), open_timeout=10,
    ) as ws:  # fmt: skip
        assert json.loads(ws.recv(timeout=60))["type"] == "loading"
        ready = json.loads(ws.recv(timeout=120))
        assert ready["type"] == "ready" and ready["checkpoint_step"] == STEPS, ready
        ws.send(json.dumps({"prompt": "the expert", "temperature": 0, "max_tokens": 8}))
        assert json.loads(ws.recv(timeout=60))["type"] == "start"
        while (message := json.loads(ws.recv(timeout=60)))["type"] == "token":
            pass
        assert message["type"] == "done" and message["tokens"] >= 1
    web_jobs = Path(group.folders("web")["JOBS_WORK_DIR"])
    assert [p.name for p in web_jobs.iterdir()] == [".cache"]  # a copy of what storage holds, nothing of its own

    # Downloads of the report's files are presigned redirects into the bucket.
    status, headers, _ = _http(base, token, "GET", f"/api/reports/{report.pk}/artifacts/model.safetensors")
    assert status == 302 and headers["Location"].startswith(s3.meta.endpoint_url)

    # No answer of the job and report APIs names a folder of any host.
    folders = [str(tmp_path), *(v for h in ("hosta", "hostb", "web") for v in group.folders(h).values())]
    for path in (
        "/api/jobs", f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/events", f"/api/jobs/{job_id}/metrics?limit=5",
        f"/api/jobs/{job_id}/reports", "/api/reports", f"/api/reports/{report.pk}",
    ):  # fmt: skip
        status, _, answer = _http(base, token, "GET", path)
        assert status == 200, (path, answer)
        text = answer.decode()
        assert not [f for f in folders if f in text], (path, text[:400])
    status, headers, _ = _http(base, token, "GET", f"/api/reports/{report.pk}/report.json")
    assert status == 302
    with urllib.request.urlopen(headers["Location"], timeout=30) as response:
        text = response.read().decode()
    assert json.loads(text)["checkpoint"]["step"] == STEPS and not [f for f in folders if f in text]


# --- The storage contract, in this process (no worker): what is stored, what a host fetches, and when ------------


@pytest.fixture
def on_s3(bucket: tuple[str, Any], moto_s3: str, monkeypatch: Any, tmp_path: Path, settings: Any) -> Iterator[Any]:
    """This process on the bucket (as every host of the test above is); yields a function that switches this
    process to host ``name`` (a work folder of its own)."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    options = {"bucket_name": bucket[0], "endpoint_url": moto_s3, "region_name": "us-east-1",
               "addressing_style": "path", "file_overwrite": False}  # fmt: skip
    storages = {"default": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": options},
                "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}  # fmt: skip
    with override_settings(STORAGES=storages):

        def host(name: str) -> None:
            settings.JOBS_WORK_DIR = tmp_path / name  # restored after the test by pytest-django

        yield host


def _checkpoint(root: Path, spec: Spec, step: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model(spec)
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(root, step, model=model, optimizer=optimizer, spec=spec, loop_state={}, data_state={})


def _keys(s3: Any, bucket: str, prefix: str) -> set[str]:
    return {o["Key"][len(prefix) :] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


def test_checkpoints_are_stored_manifest_last_pruned_as_the_folder_and_fetched_by_another_host(
    on_s3: Any, bucket: tuple[str, Any], alice: Any
) -> None:
    bucket_name, s3 = bucket
    spec_dict = tiny_spec(30)
    spec = Spec.model_validate(spec_dict)
    job = Job.objects.create(owner=alice, name="j", spec=spec_dict, data_source="d.txt", queue="gpu")
    prefix = f"jobs/job-{job.pk}/"

    on_s3("one")
    assert remote.is_mirrored()
    first = claim_folder(job)
    assert remote.restore(job, first) is None  # a new job: storage only learns whose prefix it is
    assert _keys(s3, bucket_name, prefix) == {"owner.json"}
    for step in (10, 20, 30):
        remote.store_checkpoint(job.pk, _checkpoint(first.run.checkpoints, spec, step, seed=step))
    (first.run.root / "metrics.jsonl").write_text('{"step": 30}\n')
    stored = _keys(s3, bucket_name, prefix)
    # The folder keeps the newest 2 (keep_checkpoints): so does storage.
    assert {k.split("/")[2] for k in stored if k.startswith("run/checkpoints/")} == {"step-000020", "step-000030"}
    assert remote.stored_checkpoint_steps(job.pk) == [20, 30]
    # A step whose manifest is not stored is not committed: nobody takes it.
    s3.delete_object(Bucket=bucket_name, Key=f"{prefix}run/checkpoints/step-000030/manifest.json")
    assert remote.stored_checkpoint_steps(job.pk) == [20]

    on_s3("two")
    second = claim_folder(job)
    assert remote.restore(job, second) == 20
    fetched = latest_checkpoint(second.run.checkpoints)
    assert fetched is not None and fetched.name == "step-000020"
    assert (fetched / "model.safetensors").read_bytes() == (
        first.run.checkpoints / "step-000020" / "model.safetensors"
    ).read_bytes()
    # A stored file that does not match its manifest is refused: the host falls back to what it has.
    remote.store_checkpoint(job.pk, _checkpoint(first.run.checkpoints, spec, 40, seed=40))
    s3.put_object(Bucket=bucket_name, Key=f"{prefix}run/checkpoints/step-000040/rng.pt", Body=b"x",
                  ContentType="application/octet-stream")  # fmt: skip
    assert remote.restore(job, second) is None
    assert latest_checkpoint(second.run.checkpoints) == fetched

    # Any host reads a stored checkpoint through a verified copy; a new checkpoint stored under the same step
    # (a reused id, a rollback) replaces the copy.
    remote.store_checkpoint(job.pk, _checkpoint(first.run.checkpoints, spec, 50, seed=50))
    on_s3("web")
    copy = remote.local_checkpoint(job.pk, 50)
    assert copy.is_dir() and copy.parents[3].name == ".cache"
    old = (copy / "manifest.json").read_bytes()
    remote.store_checkpoint(job.pk, _checkpoint(first.run.checkpoints, spec, 50, seed=99))
    again = remote.local_checkpoint(job.pk, 50)
    assert again == copy and (again / "manifest.json").read_bytes() != old
    assert not remote.local_checkpoint(job.pk, 20).exists()  # pruned when step 40 was stored: kept nowhere


class _HostGone(BaseException):
    """The host is gone (SIGKILL) as soon as the call it interrupts returns: nothing after that call runs."""


def test_a_host_killed_as_soon_as_a_checkpoint_is_stored_has_stored_every_record_of_its_steps(
    on_s3: Any, alice: Any, monkeypatch: Any
) -> None:
    spec_dict = tiny_spec(30, checkpoint_interval=5)
    spec = Spec.model_validate(spec_dict)
    job = Job.objects.create(owner=alice, name="j", spec=spec_dict, data_source="d.txt", queue="gpu",
                             state="running", attempts=1, lease_owner="one@h", lease_token=1)  # fmt: skip
    lease = lifecycle.Lease(pk=job.pk, token=1, attempt=1, worker="one@h")
    on_s3("one")
    first = claim_folder(job)
    remote.restore(job, first)
    # As the runner arranges them: the JSON lines written first, the records behind the mirror, which has the
    # database sink record its points (here: noted in ``order``) before it stores a checkpoint.
    order: list[str] = []
    jsonl, tensorboard = JsonlSink(first.run.metrics), TensorBoardSink(first.run.tensorboard)
    mirror = remote.MirroringSink(tensorboard, first, lease, record_points=lambda: order.append("points"))
    store_checkpoint = remote.store_checkpoint

    def store_then_die_at_step_10(job_id: int, checkpoint: Path) -> None:
        store_checkpoint(job_id, checkpoint)
        order.append(checkpoint.name)
        if checkpoint.name == "step-000010":
            raise _HostGone

    monkeypatch.setattr(remote, "store_checkpoint", store_then_die_at_step_10)
    try:
        with pytest.raises(_HostGone):
            for step in range(1, 11):
                for sink in (jsonl, mirror):
                    sink.emit(step, {"loss": 1.0 / step})
                if step % 5 == 0:
                    path = _checkpoint(first.run.checkpoints, spec, step, seed=step)
                    for sink in (jsonl, mirror):
                        sink.event("checkpoint", {"step": step, "path": str(path)})
    finally:
        jsonl.close()
        tensorboard.close()
    assert order == ["points", "step-000005", "points", "step-000010"]

    # The next host resumes from the step-10 checkpoint and writes only the steps after it: what it takes over
    # from storage holds every step up to it.
    on_s3("two")
    second = claim_folder(job)
    assert remote.restore(job, second) == 10
    assert sorted(latest_points(read_jsonl(second.run.metrics))) == list(range(1, 11))
    events = EventAccumulator(str(second.run.tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 11))


def test_a_reused_job_id_empties_the_stored_prefix(on_s3: Any, bucket: tuple[str, Any], alice: Any) -> None:
    bucket_name, s3 = bucket
    spec_dict = tiny_spec(30)
    job = Job.objects.create(owner=alice, name="j", spec=spec_dict, data_source="d.txt", queue="gpu")
    on_s3("one")
    layout = claim_folder(job)
    remote.restore(job, layout)
    remote.store_checkpoint(job.pk, _checkpoint(layout.run.checkpoints, Spec.model_validate(spec_dict), 10, 1))
    prefix = f"jobs/job-{job.pk}/"
    assert len(_keys(s3, bucket_name, prefix)) > 1
    pk = job.pk
    job.delete()
    reused = Job.objects.create(pk=pk, owner=alice, name="k", spec=spec_dict, data_source="d.txt", queue="gpu")
    assert remote.restore(reused, claim_folder(reused)) is None
    assert _keys(s3, bucket_name, prefix) == {"owner.json"}
    assert json.loads(s3.get_object(Bucket=bucket_name, Key=f"{prefix}owner.json")["Body"].read())["created_at"] == (
        reused.created_at.isoformat()
    )


def test_with_local_storage_the_job_folder_is_all_there_is(media_root: Path, alice: Any) -> None:
    from workers.engine.sinks import MemorySink

    spec_dict = tiny_spec(30)
    job = Job.objects.create(owner=alice, name="j", spec=spec_dict, data_source="d.txt", queue="gpu")
    assert not remote.is_mirrored() and remote.stored_checkpoint_steps(job.pk) is None
    layout = claim_folder(job)
    assert remote.restore(job, layout) is None
    sink = MemorySink()
    assert remote.mirrored(sink, layout, None) is sink  # type: ignore[arg-type]  # no lease needed: not wrapped
    assert remote.local_checkpoint(job.pk, 10) == layout.run.checkpoint(10)
    assert not (media_root / "jobs").exists()


def test_a_job_that_ran_before_the_bucket_is_read_from_its_folder_on_its_host(on_s3: Any, alice: Any) -> None:
    spec_dict = tiny_spec(30)
    job = Job.objects.create(owner=alice, name="j", spec=spec_dict, data_source="d.txt", queue="gpu")
    on_s3("one")
    own = _checkpoint(claim_folder(job).run.checkpoints, Spec.model_validate(spec_dict), 10, seed=1)
    assert remote.stored_checkpoint_steps(job.pk) == []
    assert remote.local_checkpoint(job.pk, 10) == own
    on_s3("two")
    assert not remote.local_checkpoint(job.pk, 10).exists()  # another host has no way to it
