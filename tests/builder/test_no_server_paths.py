"""No API response of jobs, reports or datasets shows a server path: a finished job's (its result named its
checkpoint by folder, its events named checkpoint folders) and a failed job's (its error named the data file).

The job runs on the real worker; every JSON answer about it is scanned for the folders the server keeps files in.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.test import Client

from builder.core.redaction import describe_failure, hide_server_paths
from builder.datasets.models import Dataset
from builder.reports.models import Report
from tests.builder.test_jobs import corpus, submit, wait_state  # noqa: F401  (corpus: a fixture)
from tests.builder.test_jobs import dataset as dataset  # a fixture: alice's ready tiny corpus
from tests.conftest import signed_in
from tests.services import Stack, wait_for


def server_prefixes() -> list[str]:
    """The folders whose names must never reach a client, as set and as the kernel resolves them."""
    roots = [settings.JOBS_WORK_DIR, settings.MEDIA_ROOT]
    return sorted({str(p) for root in roots for p in (Path(root), Path(os.path.realpath(root)))})


def test_paths_become_relative_to_the_job_folder_or_the_name_of_their_root(tmp_path: Path) -> None:
    job = Path(settings.JOBS_WORK_DIR) / "job-7"
    event = {"step": 10, "path": f"{job}/run/checkpoints/step-000010", "seconds": 0.5, "nested": [f"{job}"]}
    assert hide_server_paths(event, job) == {
        "step": 10, "path": "run/checkpoints/step-000010", "seconds": 0.5, "nested": ["."]
    }  # fmt: skip
    elsewhere = f"no such file: {settings.MEDIA_ROOT}/datasets/a.jsonl and {settings.JOBS_WORK_DIR}/job-70/x"
    assert hide_server_paths(elsewhere, job) == "no such file: <storage>/datasets/a.jsonl and <jobs>/job-70/x"
    assert hide_server_paths(f"{job}0/run") == "<jobs>/job-70/run"  # job-70 is not inside job-7
    error = FileNotFoundError(2, "No such file or directory", f"{tempfile.gettempdir()}/clean-x/train.jsonl")
    assert describe_failure(error) == (
        "FileNotFoundError: [Errno 2] No such file or directory: '<tmp>/clean-x/train.jsonl'"
    )
    assert hide_server_paths(f'File "{sys.prefix}/lib/x.py", line 1') == 'File "<python>/lib/x.py", line 1'


def get_json(client: Client, url: str) -> Any:
    response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    if response.streaming:  # a stored file (report.json)
        return json.loads(b"".join(response.streaming_content))  # type: ignore[attr-defined]
    return response.json()


def assert_no_server_path(client: Client, urls: list[str]) -> int:
    """Every answer is JSON without a server folder's name; returns how many bytes were scanned."""
    scanned = 0
    for url in urls:
        text = json.dumps(get_json(client, url))
        scanned += len(text)
        for prefix in server_prefixes():
            assert prefix not in text, f"{url} shows {prefix}: {text[max(0, text.find(prefix) - 200) :][:400]}"
    return scanned


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_no_api_answer_about_a_finished_or_failed_job_shows_a_server_path(
    stack: Stack, alice: Any, dataset: Dataset
) -> None:
    client = signed_in(alice)
    finished = submit(client, dataset, max_steps=20)
    bad_file = default_storage.save("datasets/test/bad.jsonl", ContentFile(b'{"text": "fine"}\n{"text": \n'))
    broken = Dataset.objects.create(
        owner=alice, name="broken", format="jsonl", file_name=bad_file, size_bytes=30, state="ready"
    )
    failed = submit(client, broken, max_steps=20)
    job = wait_state(finished["id"], {"succeeded"}, timeout=240)
    wait_state(failed["id"], {"failed"}, timeout=240)
    assert job.result["checkpoint_step"] == 20 and "checkpoint" not in job.result

    report: Report = wait_for(
        lambda: Report.objects.filter(job_id=job.pk, state__in=("succeeded", "failed")).first(),
        300,
        f"the report of job {job.pk}",
        interval=0.5,
    )
    assert report.state == "succeeded", report.error
    urls = [
        "/api/jobs",
        f"/api/jobs/{job.pk}",
        f"/api/jobs/{job.pk}/events",
        f"/api/jobs/{job.pk}/metrics?limit=5",
        f"/api/jobs/{job.pk}/reports",
        f"/api/jobs/{failed['id']}",
        f"/api/jobs/{failed['id']}/events",
        "/api/reports",
        f"/api/reports/{report.pk}",
        f"/api/reports/{report.pk}/report.json",
        "/api/datasets",
        f"/api/datasets/{dataset.pk}",
        f"/api/datasets/{broken.pk}",
        "/api/audit",
    ]
    scanned = assert_no_server_path(client, urls)
    assert scanned > 5000  # the answers were there to scan
    events = get_json(client, f"/api/jobs/{job.pk}/events")["events"]
    checkpoints = [e["data"] for e in events if e["kind"] == "checkpoint"]
    assert checkpoints and all(c["path"] == f"run/checkpoints/step-{c['step']:06d}" for c in checkpoints)
    assert checkpoints[-1]["step"] == 20
    failure = get_json(client, f"/api/jobs/{failed['id']}/events")["events"]
    error = next(e["data"] for e in failure if e["kind"] == "error")
    assert error["message"].startswith("DataFormatError: ") and "invalid JSON" in error["message"]
    assert "<app>/builder/jobs/runner.py" in error["traceback"]
