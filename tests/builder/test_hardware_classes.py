"""Hardware classes (QUEUE_HARDWARE): read from the environment, refused loudly with the variable and the item when
malformed, listed by the API with their devices and memory, and checked at launch: a job that asks for more devices
than its class has, or that cannot fit, is refused before anything is recorded, naming the field and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from builder.core.hardware_classes import DEFAULT, default_class_name, parse_class, parse_classes
from builder.datasets.models import Dataset
from builder.env import env_pairs
from builder.jobs.models import Job
from tests.builder.test_jobs import tiny_spec
from tests.conftest import signed_in
from tests.services import ROOT
from workers.engine.estimate import estimate
from workers.engine.hardware import PROFILES
from workers.engine.spec import load_spec

CLASSES = {"gpu": "t4", "gpu.a100x8": "a100-80gb:8", "cpu": "cpu"}


def _classes(raw: str | None) -> dict[str, str]:
    environ = {} if raw is None else {"QUEUE_HARDWARE": raw}
    return parse_classes(env_pairs("QUEUE_HARDWARE", DEFAULT, environ=environ))


def test_classes_come_from_the_environment_with_their_device_counts() -> None:
    assert _classes(None) == {"gpu": "cpu", "cpu": "cpu"}  # make run with no settings: gpu and cpu, on this CPU
    mapping = _classes("gpu.a100x8=a100-80gb:8, gpu.t4=t4")
    assert mapping == {"gpu.a100x8": "a100-80gb:8", "gpu.t4": "t4", "cpu": "cpu"}  # cpu (light work) always there
    assert default_class_name(mapping) == "gpu.a100x8"  # no "gpu": the first listed
    assert default_class_name(mapping, "gpu.t4") == "gpu.t4"
    assert parse_class("gpu.a100x8", "a100-80gb:8").devices == 8
    assert parse_class("gpu.t4", "t4").devices == 1
    cores = len(os.sched_getaffinity(0))
    assert parse_class("cpu", "cpu").devices == cores  # a CPU class runs one process per core


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("gpu", "'gpu' is not key=value"),
        ("gpu=", "'gpu=' is not key=value"),
        ("gpu=t4,gpu=a10", "'gpu' is given twice"),
        ("GPU=t4", "'GPU=t4': a class name is"),
        ("gpu t4=t4", "'gpu t4=t4': a class name is"),
        ("gpu.tpu=tpu-v5", "'gpu.tpu=tpu-v5': the profile must be one of"),
        ("gpu.t4=t4:0", "'gpu.t4=t4:0': the device count"),
        ("gpu.t4=t4:two", "'gpu.t4=t4:two': the device count"),
        ("gpu.t4=t4:9", "'gpu.t4=t4:9': one worker has at most 8"),
    ],
)
def test_a_malformed_class_names_the_variable_and_the_item(raw: str, says: str) -> None:
    with pytest.raises(ImproperlyConfigured) as caught:
        _classes(raw)
    assert str(caught.value).startswith("QUEUE_HARDWARE") and says in str(caught.value)


def test_a_default_class_that_is_not_a_class_names_its_variable() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"JOBS_DEFAULT_QUEUE='gpu\.h100' is not a hardware class"):
        default_class_name({"gpu": "cpu", "cpu": "cpu"}, "gpu.h100")


def test_a_bad_class_stops_start_up_and_the_queues_follow_the_classes(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"QUEUE_HARDWARE", "JOBS_DEFAULT_QUEUE"}}
    code = "from workers.celery import app; print([q.name for q in app.conf.task_queues], app.conf.task_routes)"
    for raw, expected in (
        (None, "['gpu', 'cpu'] {'jobs.train': {'queue': 'gpu'}"),
        ("gpu.t4=t4,gpu.a100x8=a100-80gb:8", "['gpu.t4', 'gpu.a100x8', 'cpu'] {'jobs.train': {'queue': 'gpu.t4'}"),
    ):
        run_env = {**env, "VAR_DIR": str(tmp_path), **({} if raw is None else {"QUEUE_HARDWARE": raw})}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 and expected in done.stdout, done.stderr
    bad = {**env, "VAR_DIR": str(tmp_path), "QUEUE_HARDWARE": "gpu=t4:x"}
    done = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=bad, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "QUEUE_HARDWARE: 'gpu=t4:x': the device count" in done.stderr


@pytest.mark.django_db
def test_the_api_lists_each_class_with_its_device_type_count_and_memory(alice: Any, settings: Any) -> None:
    settings.QUEUE_HARDWARE = CLASSES
    settings.JOBS_DEFAULT_QUEUE = "gpu"
    rows = {row["name"]: row for row in signed_in(alice).get("/api/hardware/classes").json()}
    assert list(rows) == ["gpu", "gpu.a100x8", "cpu"]
    a100 = rows["gpu.a100x8"]
    assert (a100["device_type"], a100["devices"], a100["memory_bytes"], a100["bf16"]) == (
        "cuda", 8, PROFILES["a100-80gb"].memory_bytes, True
    )  # fmt: skip
    assert (rows["gpu"]["devices"], rows["gpu"]["bf16"], rows["gpu"]["default"]) == (1, False, True)
    assert rows["cpu"]["device_type"] == "cpu" and not rows["cpu"]["default"]
    from django.test import Client

    assert Client().get("/api/hardware/classes").status_code == 401


def test_the_status_table_names_the_devices_of_each_queue_it_lists(settings: Any) -> None:
    """The status page and its live websocket render one table (``health_table_context``): a queue's name says
    nothing of its devices (the default class is called gpu and trains on the CPU), so each queue says them."""
    from django.template.loader import render_to_string

    from builder.core.health import health_table_context

    settings.QUEUE_HARDWARE = {**CLASSES, "gpu": "cpu"}  # the default when QUEUE_HARDWARE is unset
    celery = {"ok": True, "workers": 2, "queues": ["cpu", "gpu", "gpu.a100x8", "x"], "latency_ms": 3}
    report = {"status": "ok", "checks": {"celery": celery}}
    html = render_to_string("core/_health_table.html", health_table_context(report))
    text = " ".join(html.split())
    assert "2 workers consuming" in text
    assert 'data-queue="gpu">gpu on CPU<' in text and 'data-queue="cpu">cpu on CPU<' in text
    assert 'data-queue="gpu.a100x8">gpu.a100x8 on 8 × NVIDIA A100' in text
    assert 'data-queue="x">x (not a hardware class)<' in text


@pytest.fixture
def text(alice: Any) -> Dataset:
    return Dataset.objects.create(owner=alice, name="t", format="txt", file_name="datasets/x/t.txt", state="ready")


def _launch(client: Any, dataset: Dataset, spec: dict[str, Any], queue: str | None) -> Any:
    body = {"name": "multi", "spec": spec, "dataset": dataset.pk, **({"queue": queue} if queue else {})}
    return client.post("/api/jobs", body, content_type="application/json")


def _on_devices(devices: int, batch_size: int = 8) -> dict[str, Any]:
    return tiny_spec(5, batch_size=batch_size, distributed={"devices": devices})


@pytest.mark.django_db
def test_a_launch_asking_more_devices_than_its_class_has_is_refused_naming_the_field(
    alice: Any, text: Dataset, settings: Any
) -> None:
    settings.QUEUE_HARDWARE = CLASSES
    settings.JOBS_DEFAULT_QUEUE = "gpu"
    client = signed_in(alice)
    for queue in ("gpu", None):  # the default class is gpu: one T4
        response = _launch(client, text, _on_devices(4), queue)
        assert response.status_code == 422, response.content  # well-formed, but its class cannot run it
        (message,) = response.json()["spec"]
        assert message.startswith("training.distributed.devices: 4 devices asked for")
        assert "the gpu class has 1 (NVIDIA T4 16 GB)" in message
        assert "Fix: training.distributed.devices = 1, or choose a class with 4: gpu.a100x8" in message
    response = _launch(client, text, _on_devices(4), "gpu.h100")
    assert response.status_code == 400
    assert response.json()["queue"] == ['"gpu.h100" is not a hardware class (GET /api/hardware/classes lists them)']
    assert Job.objects.count() == 0  # nothing recorded, nothing sent
    response = _launch(client, text, _on_devices(4), "gpu.a100x8")
    assert response.status_code == 201, response.content
    assert Job.objects.get().queue == "gpu.a100x8"


@pytest.mark.django_db
def test_processes_that_together_outgrow_a_cpu_class_are_refused_with_how_many_fit(
    alice: Any, text: Dataset, settings: Any
) -> None:
    """On a CPU the processes share the machine's memory: each holds a replica and its share of the batch."""
    one = estimate(load_spec(tiny_spec(5, batch_size=1)), PROFILES["cpu"]).memory.peak
    fitting = PROFILES["cpu"].memory_bytes // one
    devices = fitting + 1
    settings.QUEUE_HARDWARE = {"gpu": f"cpu:{devices}", "cpu": "cpu"}
    response = _launch(signed_in(alice), text, _on_devices(devices, batch_size=devices), "gpu")
    assert response.status_code == 422, response.content
    (message,) = response.json()["spec"]
    assert message.startswith(f"training.distributed.devices: {devices} processes of about")
    assert message.endswith(f"Fix: training.distributed.devices = {fitting}.")
    assert _launch(signed_in(alice), text, _on_devices(2, batch_size=2), "gpu").status_code == 201
