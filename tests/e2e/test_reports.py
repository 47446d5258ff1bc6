"""A person watches a tiny job finish, opens its report from the dashboard, downloads the PDF and generates text in
the playground, in Chromium against the real services."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from pypdf import PdfReader

from builder.datasets.models import Dataset
from builder.reports.models import Report
from tests.builder.test_jobs import CORPUS, submit
from tests.conftest import sign_in, signed_in
from tests.services import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_open_the_report_download_the_pdf_and_generate_text(
    stack: Stack, page: Any, alice: Any, artifacts: Path
) -> None:
    name = default_storage.save("datasets/e2e/report-corpus.txt", ContentFile(CORPUS.encode()))
    dataset = Dataset.objects.create(owner=alice, name="Routing corpus", format="txt", file_name=name, state="ready")
    api = signed_in(alice)
    job = submit(api, dataset, max_steps=20)
    sign_in(page, stack.base_url, alice)

    # The dashboard: when the job succeeds its report appears (queued by the worker), and leads to the report.
    page.goto(f"{stack.base_url}/jobs/{job['id']}/")
    page.wait_for_function(
        "() => document.querySelector('[data-job-dashboard]').dataset.state === 'succeeded'", timeout=120000
    )
    page.wait_for_selector("[data-job-reports] [data-report-link]", timeout=30000)
    page.screenshot(path=str(artifacts / "report-job-dashboard.png"))
    report = Report.objects.get(job_id=job["id"])
    page.click(f"[data-report-link='{report.pk}']")
    page.wait_for_url(f"**/reports/{report.pk}/")
    # Queued or running, the page waits for the worker and reloads itself when the report is done.
    page.wait_for_selector("[data-section=deployment]", timeout=240000)
    report.refresh_from_db()
    assert report.state == "succeeded", report.error
    for section in ("summary", "training", "evaluation", "samples", "routing", "deployment", "artifacts", "spec"):
        assert page.locator(f"[data-section={section}]").is_visible()
    assert page.locator(".report-figure svg").count() == 3
    assert page.locator("[data-field=sha256]").inner_text() == report.document["checkpoint"]["sha256"]
    assert page.locator("[data-testid=latency-table] tbody tr").count() == 6
    assert page.locator("nav [aria-current=page]").inner_text() == "Reports"
    page.screenshot(path=str(artifacts / "report-page.png"), full_page=True)
    page.locator("[data-section=routing]").screenshot(path=str(artifacts / "report-routing.png"))

    # The PDF downloads through the browser and has the sections and figures.
    with page.expect_download() as download_info:
        page.click("[data-testid=download-pdf]")
    download = download_info.value
    assert download.suggested_filename == f"job-{job['id']}-step-20-report.pdf"
    target = artifacts / "report.pdf"
    download.save_as(str(target))
    reader = PdfReader(io.BytesIO(target.read_bytes()))
    text = "\n".join(p.extract_text() for p in reader.pages)
    assert 2 <= len(reader.pages) <= 8
    for title in ("Summary", "Training curves", "Evaluation", "Samples", "Expert load", "Which to deploy"):
        assert title in text

    # The playground: tokens arrive one by one over the websocket.
    page.click("[data-testid=open-playground]")
    page.wait_for_url(f"**/reports/{report.pk}/playground/")
    page.wait_for_function("() => document.querySelector('[data-playground]').dataset.state === 'ready'")
    assert "Ready: step 20" in page.locator("[data-field=status]").inner_text()
    # A bad value is refused by the server, next to its field.
    page.fill("[name=max_tokens]", "100000")
    page.click("[data-action=run]")
    error = page.locator("[data-error-for=max_tokens]")
    error.wait_for(state="visible")
    assert "max_tokens must be between 1 and 256" in error.inner_text()
    assert page.locator("[name=max_tokens]").get_attribute("aria-invalid") == "true"
    page.fill("[name=max_tokens]", "48")
    page.fill("#pg-prompt", "the expert 3 routes token")
    # Greedy decoding: sampled, a model trained for 20 steps ends the text at once (its first token <eos>) in
    # about 1 generation in 75, which shows no tokens arriving.
    page.fill("[name=temperature]", "0")
    page.click("[data-action=run]")
    page.wait_for_function("() => Number(document.querySelector('[data-field=generated]').dataset.tokens) >= 1")
    page.wait_for_function("() => document.querySelector('[data-playground]').dataset.state === 'done'")
    tokens = int(page.locator("[data-field=generated]").get_attribute("data-tokens") or 0)
    assert 1 <= tokens <= 48
    assert page.locator("[data-field=prompt-echo]").inner_text() == "the expert 3 routes token"
    stats = page.locator("[data-field=stats]").inner_text()
    assert f"{tokens} {'piece' if tokens == 1 else 'pieces'} in" in stats
    assert stats.endswith(("the model ended the text", "max tokens reached")), stats
    assert page.locator("[data-error-for=max_tokens]").is_hidden()
    page.screenshot(path=str(artifacts / "report-playground.png"), full_page=True)

    # Sampling with a seed: a bad seed is refused next to its field; the same seed gives the same text.
    page.fill("[name=temperature]", "0.8")
    page.fill("[name=seed]", "-1")
    page.click("[data-action=run]")
    seed_error = page.locator("[data-error-for=seed]")
    seed_error.wait_for(state="visible")
    assert "seed must be between 0 and 9007199254740992" in seed_error.inner_text()
    texts = []
    for _ in range(2):
        page.fill("[name=seed]", "11")
        page.click("[data-action=run]")
        page.wait_for_function("() => document.querySelector('[data-playground]').dataset.state === 'done'")
        texts.append(
            (page.locator("[data-field=generated]").inner_text(), page.locator("[data-field=stats]").inner_text())
        )
    assert texts[0][0] == texts[1][0] and texts[0][1].split(" in ")[0] == texts[1][1].split(" in ")[0]
    assert seed_error.is_hidden()

    # The reports list has it, with its headline metric and downloads.
    page.goto(f"{stack.base_url}/reports/")
    row = page.locator(f"[data-report-row='{report.pk}']")
    assert "ppl" in row.inner_text() and row.locator("a", has_text="PDF").count() == 1
    page.screenshot(path=str(artifacts / "reports-list.png"), full_page=True)


def test_evaluate_a_stopped_job_from_its_dashboard(stack: Stack, page: Any, alice: Any, artifacts: Path) -> None:
    """The owner's Evaluate button on a cancelled job: the report is queued and its page follows the worker. This
    job's checkpoint is not on any worker (it never trained), so the report fails, and says why."""
    from builder.jobs.models import Job
    from tests.builder.test_jobs import tiny_spec

    job = Job.objects.create(
        owner=alice, name="stopped early", spec=tiny_spec(20), data_source="datasets/none.txt", state="cancelled",
        step=10, total_steps=20, last_checkpoint_step=10,
    )  # fmt: skip
    sign_in(page, stack.base_url, alice)
    page.goto(f"{stack.base_url}/jobs/{job.pk}/")
    page.wait_for_function("() => document.querySelector('[data-job-dashboard]').dataset.state === 'cancelled'")
    button = page.locator("[data-testid=evaluate]")
    button.wait_for(state="visible")
    button.click()
    page.wait_for_url("**/reports/*/")
    report = Report.objects.get(job=job)
    assert report.trigger == "requested" and report.checkpoint_step == 10
    failed = page.locator("[data-testid=report-failed]")
    failed.wait_for(state="visible", timeout=60000)
    assert "the checkpoint of step 10 is not on this worker" in failed.inner_text()
    assert page.locator("[data-testid=report-failed] button", has_text="Try again").count() == 1
    page.screenshot(path=str(artifacts / "report-failed.png"), full_page=True)
