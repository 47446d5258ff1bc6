"""The jobs pages and the launch paths (form and API with a saved configuration), with the outsider's view.

No services: ``on_commit`` callbacks (the task dispatch) never fire inside the test's transaction.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from builder.configs.models import Config, ConfigVersion
from builder.datasets.models import Dataset
from builder.jobs.models import Job, MetricPoint
from tests.builder.test_jobs_lifecycle import SPEC
from tests.conftest import signed_in
from workers.engine.spec import load_spec

pytestmark = pytest.mark.django_db


@pytest.fixture
def dataset(alice: Any) -> Dataset:
    return Dataset.objects.create(owner=alice, name="Alice's corpus", format="txt", file_name="a.txt", state="ready")


@pytest.fixture
def version(alice: Any) -> ConfigVersion:
    config = Config.objects.create(owner=alice, name="Tiny MoE")
    return ConfigVersion.objects.create(config=config, number=1, spec=SPEC)


def json_script(html: str, element_id: str) -> Any:
    """The data of a ``json_script`` element of the page."""
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</script>', html, re.S)
    assert match is not None, f"no #{element_id} in the page"
    return json.loads(match.group(1))


def job_with_points(owner: Any, name: str, losses: list[float]) -> Job:
    job = Job.objects.create(owner=owner, name=name, spec=SPEC, data_source="a.txt", state="succeeded", total_steps=10)
    MetricPoint.objects.bulk_create(
        MetricPoint(job=job, seq=i + 1, step=i + 1, name="loss", value=v) for i, v in enumerate(losses)
    )
    Job.objects.filter(pk=job.pk).update(metric_seq=len(losses), step=len(losses))
    return job


def test_the_list_shows_only_visible_jobs(alice: Any, bob: Any, charlie: Any) -> None:
    mine = job_with_points(alice, "alice-run", [3.0, 2.0])
    theirs = job_with_points(charlie, "charlie-run", [1.0])
    page = signed_in(alice).get("/jobs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "alice-run" in html and "charlie-run" not in html
    assert f'data-job-row="{mine.pk}"' in html and f'data-job-row="{theirs.pk}"' not in html
    assert 'aria-current="page">Jobs' in html
    # The home page's card for the section leads here, not to a placeholder.
    assert 'href="/jobs/"' in signed_in(alice).get("/").content.decode()
    empty = signed_in(bob).get("/jobs/")  # bob has no job and is shared none
    assert 'data-testid="no-jobs"' in empty.content.decode()


def test_the_dashboard_is_the_owners_and_the_shared_users_only(alice: Any, bob: Any, charlie: Any) -> None:
    job = job_with_points(alice, "watch-me", [3.0])
    page = signed_in(alice).get(f"/jobs/{job.pk}/")
    assert page.status_code == 200
    html = page.content.decode()
    config = json_script(html, "job-dashboard-config")
    assert config["ws"] == f"/ws/jobs/{job.pk}/" and config["can_control"] is True
    # The routing settings with their defaults, for the dead-expert alert's advice.
    assert config["moe"]["balancing"] == "aux_free" and config["moe"]["bias_update_speed"] > 0
    assert config["job"]["state"] == "succeeded"
    assert 'data-action="cancel"' in html and f"/api/jobs/{job.pk}/metrics.csv" in html
    assert signed_in(charlie).get(f"/jobs/{job.pk}/").status_code == 404
    assert signed_in(charlie).get(f"/api/jobs/{job.pk}/metrics.csv").status_code == 404
    assert signed_in(charlie).get(f"/api/jobs/{job.pk}/tensorboard.tar.gz").status_code == 404
    assert signed_in(charlie).get(f"/api/jobs/{job.pk}/events").status_code == 404
    # Shared with bob: he watches, but has no controls and cannot cancel; charlie still sees nothing.
    job.shared_with.add(bob)
    shared = signed_in(bob).get(f"/jobs/{job.pk}/").content.decode()
    assert "watch-me" in shared and 'data-action="cancel"' not in shared
    assert signed_in(bob).post(f"/api/jobs/{job.pk}/cancel").status_code == 403
    assert signed_in(charlie).get(f"/jobs/{job.pk}/").status_code == 404
    assert signed_in(alice).get("/jobs/999999/").status_code == 404


def test_the_dashboard_says_what_the_jobs_queue_trains_on(alice: Any, settings: Any) -> None:
    """The header names the queue's devices and the memory chart the figure it plots: a queue's name does not say
    (the default class is called gpu and trains on the CPU; a CUDA class may have any name)."""
    settings.QUEUE_HARDWARE = {"gpu": "cpu", "big.a100x8": "a100-80gb:8", "cpu": "cpu"}
    job = job_with_points(alice, "where", [3.0])
    for queue, devices, memory in [
        ("gpu", "on CPU", "process RSS</span>"),
        ("big.a100x8", "on 8 × NVIDIA A100", "CUDA peak</span>"),
        ("retired", "not a hardware class", "CUDA peak, or process RSS on CPU</span>"),
    ]:
        Job.objects.filter(pk=job.pk).update(queue=queue)
        html = signed_in(alice).get(f"/jobs/{job.pk}/").content.decode()
        cell = re.search(r'data-field="queue-devices">([^<]*)<', html)
        assert cell is not None and cell.group(1).startswith(devices), (queue, cell)
        assert f'<span class="muted small">{memory}' in html, queue


def test_the_overlay_plots_two_runs_and_refuses_what_it_cannot(alice: Any, charlie: Any, monkeypatch: Any) -> None:
    from builder.jobs import views

    a = job_with_points(alice, "run-a", [3.0, 2.5, 2.0])
    b = job_with_points(alice, "run-b", [3.1, 2.9])
    c = job_with_points(charlie, "run-c", [1.0])
    page = signed_in(alice).get(f"/jobs/compare/?ids={a.pk}&ids={b.pk}&metric=loss")
    assert page.status_code == 200
    overlay = json_script(page.content.decode(), "job-overlay-data")
    assert [run["name"] for run in overlay["runs"]] == ["run-a", "run-b"]
    assert overlay["runs"][0]["series"] == {"step": [1, 2, 3], "value": [3.0, 2.5, 2.0]}
    # Someone else's run among them: nothing is shown, and nothing says which one.
    assert signed_in(alice).get(f"/jobs/compare/?ids={a.pk}&ids={c.pk}").status_code == 404
    assert signed_in(charlie).get(f"/jobs/compare/?ids={a.pk}&ids={b.pk}").status_code == 404
    # Ids as a person types them, comma-separated, give the same chart.
    typed = signed_in(alice).get(f"/jobs/compare/?ids={a.pk},{b.pk}&metric=loss")
    assert typed.status_code == 200 and json_script(typed.content.decode(), "job-overlay-data") == overlay
    malformed = signed_in(alice).get(f"/jobs/compare/?ids={a.pk},x")
    assert malformed.status_code == 400 and "ids: &#x27;x&#x27; is not a job id" in malformed.content.decode()
    repeated = signed_in(alice).get("/jobs/compare/?" + "&".join([f"ids={a.pk}"] * 5 + [f"ids={b.pk}"] * 5))
    assert repeated.status_code == 200  # repeats count once, never toward the limit
    bad = signed_in(alice).get(f"/jobs/compare/?ids={a.pk}&ids={b.pk}&metric=nope")
    assert bad.status_code == 400 and "metric: choose one of" in bad.content.decode()
    # One run, or none: the error, and a picker of the user's own runs (never another's), the chosen one ticked.
    one = signed_in(alice).get(f"/jobs/compare/?ids={a.pk}").content.decode()
    assert "ids: select at least two" in one and 'data-testid="compare-picker"' in one
    ticked = re.findall(r'name="ids" value="(\d+)"[^>]*?(checked)?>', one)
    assert ticked == [(str(a.pk), "checked"), (str(b.pk), "")]  # the chosen first, then the newest
    first_visit = signed_in(alice).get("/jobs/compare/")
    assert first_visit.status_code == 200 and 'data-testid="compare-picker"' in first_visit.content.decode()
    assert "compare-error" not in first_visit.content.decode()
    nothing = signed_in(charlie).get("/jobs/compare/").content.decode()
    assert "run-a" not in nothing and "run-c" in nothing
    # ``pick`` shows the picker beside the chart, both runs ticked.
    chart = signed_in(alice).get(f"/jobs/compare/?ids={a.pk}&ids={b.pk}&metric=lr").content.decode()
    assert f'href="/jobs/compare/?ids={a.pk}&amp;ids={b.pk}&amp;metric=lr&amp;pick=1"' in chart  # "change runs"
    both = signed_in(alice).get(f"/jobs/compare/?ids={a.pk}&ids={b.pk}&pick=1")
    assert both.status_code == 200 and "job-overlay-data" in both.content.decode()
    assert len(re.findall(r'name="ids" value="\d+"[^>]*checked', both.content.decode())) == 2
    # A chosen run older than the ones the picker lists stays in it, ticked.
    monkeypatch.setattr(views, "MAX_PICKER_JOBS", 1)
    older = signed_in(alice).get(f"/jobs/compare/?ids={a.pk}&ids={b.pk}&pick=1").content.decode()
    assert re.findall(r'name="ids" value="(\d+)"[^>]*checked', older) == [str(a.pk), str(b.pk)]


def test_the_overlay_names_the_limit_of_runs_on_one_chart(alice: Any) -> None:
    from builder.jobs.views import MAX_OVERLAY_JOBS

    runs = [job_with_points(alice, f"run-{i}", [3.0 - i / 10]) for i in range(MAX_OVERLAY_JOBS + 1)]
    page = signed_in(alice).get("/jobs/compare/?ids=" + ",".join(str(r.pk) for r in runs))
    html = page.content.decode()
    assert page.status_code == 400 and f"ids: at most {MAX_OVERLAY_JOBS} runs fit on one chart (9 chosen)" in html
    overlay = json_script(html, "job-overlay-data")
    assert [r["name"] for r in overlay["runs"]] == [f"run-{i}" for i in range(MAX_OVERLAY_JOBS)]


def test_launch_from_a_saved_configuration(alice: Any, charlie: Any, dataset: Dataset, version: ConfigVersion) -> None:
    client = signed_in(alice)
    form = client.get(f"/jobs/new/?config_version={version.pk}")
    assert form.status_code == 200
    assert f'<option value="{version.pk}" selected>Tiny MoE v1</option>' in form.content.decode()
    response = client.post("/jobs/new/", {"config_version": version.pk, "dataset": dataset.pk, "queue": "gpu"})
    job = Job.objects.get(owner=alice)
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.pk}/"
    assert (job.name, job.config_version, job.dataset, job.queue) == ("Tiny MoE v1", version, dataset, "gpu")
    assert job.spec["model"] == load_spec(version.spec).model_dump(mode="json")["model"] and job.state == "queued"
    # Charlie can use neither alice's configuration nor her dataset; each error is at its field.
    refused = signed_in(charlie).post(
        "/jobs/new/", {"config_version": version.pk, "dataset": dataset.pk, "queue": "tpu"}
    )
    html = refused.content.decode()
    assert refused.status_code == 400
    for field in ("config_version", "dataset", "queue"):
        assert f'data-error-for="{field}"' in html
    assert Job.objects.filter(owner=charlie).count() == 0


def test_launch_past_the_limit_says_why(alice: Any, dataset: Dataset, version: ConfigVersion, settings: Any) -> None:
    settings.JOBS_MAX_ACTIVE_PER_USER = 1
    client = signed_in(alice)
    client.post("/jobs/new/", {"config_version": version.pk, "dataset": dataset.pk, "queue": "cpu"})
    refused = client.post("/jobs/new/", {"config_version": version.pk, "dataset": dataset.pk, "queue": "cpu"})
    assert refused.status_code == 400 and "limit 1" in refused.content.decode()
    assert Job.objects.filter(owner=alice).count() == 1


def test_the_api_takes_a_saved_configuration(
    alice: Any, charlie: Any, dataset: Dataset, version: ConfigVersion
) -> None:
    client = signed_in(alice)
    body = {"config_version": version.pk, "dataset": dataset.pk}
    created = client.post("/api/jobs", body, content_type="application/json")
    assert created.status_code == 201, created.content
    job = created.json()
    assert job["name"] == "Tiny MoE v1" and job["dataset"] == dataset.pk and job["queue"] == "gpu"
    assert job["dataset_name"] == "Alice's corpus" and job["state"] == "queued" and job["queue_position"] == 1
    both = client.post("/api/jobs", {**body, "spec": SPEC}, content_type="application/json")
    assert both.status_code == 422 and "not both" in both.json()["spec"][0]
    nameless = client.post("/api/jobs", {"spec": SPEC, "dataset": dataset.pk}, content_type="application/json")
    assert nameless.status_code == 422 and set(nameless.json()) == {"name"}
    outsider = signed_in(charlie).post("/api/jobs", body, content_type="application/json")
    # Ids that name nothing of charlie's: 422 (well-formed ids, every problem of that kind).
    assert outsider.status_code == 422 and set(outsider.json()) == {"config_version", "dataset"}
    schema = client.get("/api/schema?format=json").json()
    for route in ("/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/cancel", "/api/jobs/{job_id}/resume",
                  "/api/jobs/{job_id}/metrics", "/api/jobs/{job_id}/events"):  # fmt: skip
        assert route in schema["paths"], route
