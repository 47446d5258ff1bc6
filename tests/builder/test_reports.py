"""Reports without services: the document and its formats from real tiny checkpoints, the JSON Schema,
determinism, requests and claims, pages, downloads and the outsider's view, playground request validation.

The checkpoints are trained and evaluated in this process by the engine (a few seconds, one thread); the export
and latency measurement are the worker's (tests/builder/test_reports_worker.py runs them): here the deployment
figures have the engine's shape and go through the engine's own ``deployment_advice``.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from django.test import Client
from django.utils import timezone
from pypdf import PdfReader

from builder.core.durable import WorkState
from builder.core.errors import Refusal
from builder.jobs.models import Job, JobEvent, MetricPoint
from builder.reports import figures as draw
from builder.reports import playground, render, runner
from builder.reports.document import clean, iso
from builder.reports.models import Report
from builder.reports.schema import REPORT_SCHEMA
from builder.reports.services import request_report
from builder.reports.work import REPORTS
from tests.builder.test_jobs import CORPUS, tiny_spec
from tests.conftest import signed_in
from workers.engine.evaluate import evaluate
from workers.engine.export import VARIANTS, deployment_advice
from workers.engine.layout import RunLayout
from workers.engine.sinks import MemorySink
from workers.engine.spec import load_spec
from workers.engine.train import train

SECTIONS = ("Summary", "Training", "Evaluation", "Samples", "Routing", "Deployment", "Artifacts", "Spec")
FIGURE_CAPTIONS = ("Training curves", "Expert load", "Latency per forward pass")
T1 = datetime(2026, 12, 1, 15, 0, 0, tzinfo=UTC)
T2 = datetime(2026, 12, 2, 9, 30, 0, tzinfo=UTC)


def classifier_spec() -> dict[str, Any]:
    spec = tiny_spec(12)
    spec["model"].update(task="classification", num_labels=3)
    spec["data"]["val_fraction"] = 0.25
    return spec


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """Two finished tiny runs (a language model and a 3-label classifier) with the engine's evaluation of each:
    ``{"causal_lm" | "classification": {"checkpoint", "evaluation", "spec"}}``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared 2-core machine
    root = tmp_path_factory.mktemp("report-runs")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    labelled = root / "labelled.jsonl"
    words = {"ops": "add subtract multiply", "io": "read write print", "$ money <b>": "pay cost price"}
    with labelled.open("w") as fh:
        for i in range(90):
            label = list(words)[i % 3]
            fh.write(json.dumps({"text": f"{words[label]} item {i}", "label": label}) + "\n")
    runs = {}
    try:
        for task, spec_dict, source in (("causal_lm", tiny_spec(20), corpus), ("classification", classifier_spec(),
                                                                                labelled)):  # fmt: skip
            spec = load_spec(spec_dict)
            result = train(spec, source, root / task, MemorySink(), device="cpu")
            assert result.status == "completed" and result.checkpoint is not None
            raw = evaluate(result.checkpoint, root / task / "data", max_examples=64, prompts=8, max_new_tokens=12)
            runs[task] = {"checkpoint": result.checkpoint, "evaluation": raw, "spec": spec_dict}
        yield runs
    finally:
        torch.set_num_threads(previous)


def latency_report(spec: dict[str, Any]) -> dict[str, Any]:
    """What ``measure_latency`` returns (its shape, fixed figures): the worker measures the real ones."""
    ms = {"pytorch_fp32": (2.0, 6.0), "pytorch_int8": (1.5, 4.0), "onnxruntime_fp32": (0.5, 1.5)}
    seq_len = spec["data"]["seq_len"]
    return {
        "settings": {"batch_sizes": [1, 8], "seq_len": seq_len, "repeats": 20, "warmup": 2, "threads": 2,
                     "device": "cpu"},
        "variants": {
            name: {
                "label": label,
                "size_bytes": {"pytorch_fp32": 190000, "pytorch_int8": 100000, "onnxruntime_fp32": 250000}[name],
                "latency": [
                    {"batch_size": b, "median_ms": m, "p90_ms": m * 1.2, "tokens_per_s": b * seq_len / (m / 1000)}
                    for b, m in zip((1, 8), ms[name], strict=True)
                ],
            }
            for name, label in VARIANTS.items()
        },
    }  # fmt: skip


def make_job(owner: Any, spec: dict[str, Any], **fields: Any) -> Job:
    """A finished job with a metric record and the events a report lists."""
    job = Job.objects.create(
        owner=owner, name=fields.pop("name", "tiny run"), spec=spec, data_source="datasets/t/corpus.txt",
        state=fields.pop("state", "succeeded"), total_steps=spec["training"]["max_steps"],
        step=spec["training"]["max_steps"], last_checkpoint_step=spec["training"]["max_steps"], attempts=1,
        started_at=T1 - timedelta(minutes=3), finished_at=T1 - timedelta(minutes=1),
        result={"status": "completed", "reason": "reached max_steps", "train_seconds": 42.5}, **fields,
    )  # fmt: skip
    points = []
    for step in range(1, job.total_steps + 1):
        points += [(step, "loss", 5.0 - 0.1 * step), (step, "lr", 3e-3)]
        if step % 10 == 0:
            points.append((step, "val_loss", 4.8 - 0.1 * step))
    MetricPoint.objects.bulk_create(
        MetricPoint(job=job, seq=i + 1, step=step, name=name, value=value)
        for i, (step, name, value) in enumerate(points)
    )
    Job.objects.filter(pk=job.pk).update(metric_seq=len(points), event_seq=2)
    JobEvent.objects.create(
        job=job,
        seq=1,
        step=6,
        kind="intervention",
        data={"step": 6, "reason": "plateau", "changes": {"lr": {"before": 3e-3, "after": 1.5e-3}}},
    )
    JobEvent.objects.create(job=job, seq=2, step=8, kind="anomaly",
                            data={"step": 8, "kind": "loss_spike", "loss": 9.5, "action": "rollback"})  # fmt: skip
    job.refresh_from_db()
    return job


def finished_report(job: Job, run: dict[str, Any]) -> Report:
    """``job``'s report as the worker records it (the engine's evaluation; stored artifacts and formats)."""
    assert job.last_checkpoint_step is not None
    report = Report.objects.create(job=job, checkpoint_step=job.last_checkpoint_step, state="running", attempts=1)
    checkpoint: Path = run["checkpoint"]
    exported = {
        "model.safetensors": checkpoint / "model.safetensors",
        "spec.json": checkpoint / "spec.json",
        "tokenizer.json": checkpoint.parent.parent / "data" / "tokenizer.json",
    }
    latency = latency_report(run["spec"])
    fields = runner.assemble(
        report,
        evaluation=runner.normalize_evaluation(clean(run["evaluation"])),
        deployment=runner.normalize_deployment(clean(latency), clean(deployment_advice(latency))),
        exported=exported,
        timings={"evaluate_s": 0.5, "export_s": 11.0, "latency_s": 3.0},
    )
    Report.objects.filter(pk=report.pk).update(state=WorkState.SUCCEEDED, finished_at=timezone.now(), **fields)
    report.refresh_from_db()
    return report


def pdf_text(data: bytes) -> tuple[int, str]:
    reader = PdfReader(io.BytesIO(data))
    return len(reader.pages), "\n".join(page.extract_text() for page in reader.pages)


def body(response: Any) -> bytes:
    """The bytes of a download (a FileResponse streams)."""
    return b"".join(response.streaming_content) if response.streaming else bytes(response.content)


# --------------------------------------------------------------------------------------------------------
# The document and its formats
# --------------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_every_format_has_the_sections_and_only_the_timestamp_changes(
    engine_runs: dict[str, Any], alice: Any, media_root: Path
) -> None:
    run = engine_runs["causal_lm"]
    report = finished_report(make_job(alice, run["spec"]), run)
    document, figures = report.document, report.figures
    assert set(figures) == {"training", "routing", "latency"}

    first = render.stored_formats(document, figures, T1)
    again = render.stored_formats(document, figures, T1)
    assert first == again  # byte for byte, the PDF included
    later = render.stored_formats(document, figures, T2)
    for name in ("report.html", "report.md", "report.json"):
        assert first[name] != later[name]
        assert first[name].decode().replace(iso(T1), "T") == later[name].decode().replace(iso(T2), "T")
    pages, text = pdf_text(first["report.pdf"])
    later_pages, later_text = pdf_text(later["report.pdf"])
    assert pages == later_pages and 2 <= pages <= 8
    assert text.replace("2026-12-01T15:00:00Z", "T") == later_text.replace("2026-12-02T09:30:00Z", "T")

    # Every section and figure is in the PDF (figure text stays text: tick labels and titles).
    for section in SECTIONS:
        assert re.search(rf"^{section}$", text, re.M), section
    for caption in FIGURE_CAPTIONS:
        assert caption in text
    assert "Learning rate" in text and "milliseconds per forward pass" in text and "layer 0" in text
    assert document["checkpoint"]["sha256"] in text.replace("\n", "")
    assert "plateau intervention (plateau): lr 0.003 → 0.0015" in text
    assert "anomaly: loss_spike (loss 9.5), rollback" in text
    assert "ONNX Runtime fp32" in text and "Which to deploy" in text

    html = first["report.html"].decode()
    assert html.count("<svg") == 3 and "<script" not in html
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "element ids repeat across figures"
    markdown = first["report.md"].decode()
    for section in SECTIONS:
        assert f"## {section}" in markdown
    assert "| PyTorch int8 (dynamic) | 8 |" in markdown and "step 6: plateau intervention" in markdown

    # What the worker stored is what renders: the stored JSON is the document at its generation time.
    stored = json.loads((media_root / report.artifacts["report.json"]["storage"]).read_bytes())
    assert report.generated_at is not None
    assert stored == json.loads(render.render_json(document, report.generated_at))


@pytest.mark.django_db
def test_json_follows_its_schema_for_both_tasks(engine_runs: dict[str, Any], alice: Any, media_root: Path) -> None:
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    validator = jsonschema.Draft202012Validator(REPORT_SCHEMA, format_checker=jsonschema.FormatChecker())
    for task, run in engine_runs.items():
        report = finished_report(make_job(alice, run["spec"], name=task), run)
        document = json.loads(render.render_json(report.document, T1))
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, errors
        assert document["schema_version"] == 1 and document["generated_at"] == "2026-12-01T15:00:00Z"
        assert document["task"] == task
        assert [a["name"] for a in document["artifacts"]] == ["model.safetensors", "spec.json", "tokenizer.json"]
        broken = {**document, "checkpoint": {"step": 20}}
        assert any("sha256" in e.message for e in validator.iter_errors(broken))
    # The schema is served, and documented in the API schema.
    client = signed_in(alice)
    served = client.get("/api/reports/schema")
    assert served.status_code == 200 and served.json() == REPORT_SCHEMA
    paths = client.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()["paths"]
    for path in (
        "/api/reports",
        "/api/reports/{report_id}",
        "/api/reports/{report_id}/{name}",
        "/api/reports/{report_id}/artifacts/{name}",
        "/api/jobs/{job_id}/reports",
        "/api/reports/schema",
    ):
        assert path in paths, path  # fmt: skip


@pytest.mark.django_db
def test_a_deepseek_style_run_reports_its_mtp_loss_kv_cache_and_optimizer(
    alice: Any, media_root: Path, tmp_path: Path, artifacts: Path
) -> None:
    """Latent attention, one MTP module and Muon: the report shows the MTP loss (evaluated and the training
    curve's last value), the KV cache per token next to multi-head attention's, and the optimizer."""
    spec_dict = tiny_spec(12)
    spec_dict["model"].update(
        attention="mla",
        mtp_depth=1,
        mla={"kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16},
    )
    spec_dict["training"]["optimizer"] = {"name": "muon", "lr": 3e-3, "adamw_lr": 3e-3}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sink = MemorySink()
        result = train(load_spec(spec_dict), corpus, tmp_path / "run", sink, device="cpu")
        assert result.status == "completed" and result.checkpoint is not None
        raw = evaluate(result.checkpoint, tmp_path / "run" / "data", max_examples=16, prompts=2, max_new_tokens=4)
    finally:
        torch.set_num_threads(previous)
    job = make_job(alice, spec_dict)
    mtp_points = sink.series("mtp_loss")
    assert len(mtp_points) == 12
    MetricPoint.objects.bulk_create(
        MetricPoint(job=job, seq=job.metric_seq + i + 1, step=step, name="mtp_loss", value=value)
        for i, (step, value) in enumerate(mtp_points)
    )
    Job.objects.filter(pk=job.pk).update(metric_seq=job.metric_seq + len(mtp_points))
    report = finished_report(job, {"checkpoint": result.checkpoint, "evaluation": raw, "spec": spec_dict})
    document = json.loads(render.render_json(report.document, T1))
    validator = jsonschema.Draft202012Validator(REPORT_SCHEMA, format_checker=jsonschema.FormatChecker())
    assert not [e.message for e in validator.iter_errors(document)]
    assert document["evaluation"]["mtp_loss"] == pytest.approx(raw["metrics"]["val_mtp_loss"])
    assert document["training"]["final"]["mtp_loss"] == pytest.approx(mtp_points[-1][1])
    assert document["training"]["series"]["mtp_loss"]["step"][-1] == 12
    # 2 layers × (latent 16 + rotary key 8) fp32 numbers, against 2 layers × keys and values of 2 heads of 16.
    assert document["model"]["kv_cache"] == {"attention": "mla", "bytes_per_token": 192, "bytes_per_token_mha": 512}
    assert document["model"]["optimizer"] == "muon" and document["model"]["mtp_depth"] == 1

    formats = render.stored_formats(report.document, report.figures, T1)
    html = formats["report.html"].decode()
    (artifacts / "report-deepseek-style.html").write_text(html)  # (a person looks at it)
    mtp_row = re.search(r'data-metric="MTP loss">([^<]+)<', html)
    assert mtp_row is not None and mtp_row.group(1) == render.num(raw["metrics"]["val_mtp_loss"])
    kv = html[html.index('data-testid="kv-cache"') : html.index("</table>", html.index('data-testid="kv-cache"'))]
    assert "multi-head latent (MLA)" in kv and "192 B" in kv and "512 B" in kv and "2.7× more" in kv
    assert '<th scope="row">Optimizer</th><td>muon, cosine schedule</td>' in html
    assert "<td>1 module(s), ignored by generation</td>" in html
    markdown = formats["report.md"].decode()
    assert "| MTP loss |" in markdown and "| this model: multi-head latent (MLA) | 192 B |" in markdown
    _, text = pdf_text(formats["report.pdf"])
    assert "KV cache" in text and "MTP loss" in text
    # A multi-head model's report shows its own cache without the comparison; a classifier has none.
    mha = render.sections({**document, "model": {**document["model"], "kv_cache": {
        "attention": "mha", "bytes_per_token": 512, "bytes_per_token_mha": 512}}})["kv_cache"]  # fmt: skip
    assert mha is not None and len(mha) == 1
    assert render.sections({**document, "model": {"total_parameters": 1, "active_parameters": 1}})["kv_cache"] is None


@pytest.mark.django_db
def test_a_classifier_report_has_its_confusion_matrix(
    engine_runs: dict[str, Any], alice: Any, media_root: Path
) -> None:
    run = engine_runs["classification"]
    report = finished_report(make_job(alice, run["spec"]), run)
    assert set(report.figures) == {"training", "routing", "latency", "confusion"}
    evaluation = report.document["evaluation"]
    assert sorted(evaluation["confusion"]["labels"]) == ["$ money <b>", "io", "ops"]
    assert 0 <= evaluation["accuracy"] <= 1 and "perplexity" not in evaluation
    # A label with "$" and "<" is drawn as written (no mathtext) and escaped in the SVG.
    assert "$ money &lt;b&gt;" in report.figures["confusion"] and "<b>" not in report.figures["confusion"]
    files = render.stored_formats(report.document, report.figures, T1)
    _, text = pdf_text(files["report.pdf"])
    assert "Confusion matrix" in text and "Accuracy" in text and "Macro-F1" in text and "predicted" in text
    assert "### Confusion matrix" in files["report.md"].decode()
    page = signed_in(alice).get(f"/reports/{report.pk}/").content.decode()
    assert 'data-figure="confusion"' in page and page.count("<svg") == 4


def test_figures_are_deterministic_and_need_no_data() -> None:
    series: dict[str, dict[str, Sequence[float]]] = {"loss": {"step": [1, 2, 3], "value": [3.0, 2.0, 1.0]}}
    one = draw.training_curves(series, [{"step": 2, "kind": "anomaly"}])
    assert one == draw.training_curves(series, [{"step": 2, "kind": "anomaly"}])
    assert one.startswith("<svg") and "<?xml" not in one and "Date" not in one
    assert set(re.findall(r'\bid="([a-z]+)-', one)) == {"training"}
    for empty in (
        draw.training_curves({}, []),
        draw.routing_heatmap([], []),
        draw.latency_bars([]),
        draw.confusion_matrix([], []),
    ):
        assert "no data" in empty  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Requests, claims and access
# --------------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_requests_are_idempotent_and_refusals_name_the_reason(alice: Any, bob: Any, charlie: Any) -> None:
    job = make_job(alice, tiny_spec(20))
    job.shared_with.add(bob)
    first = request_report(job, user=alice)
    assert first.created and first.report.state == "queued" and first.report.checkpoint_step == 20
    again = request_report(job, user=alice)
    assert not again.created and again.report.pk == first.report.pk
    # A failed report is queued again by the next request; one that is running is left alone.
    Report.objects.filter(pk=first.report.pk).update(state="failed", error="boom")
    assert request_report(job).report.state == "queued"
    Report.objects.filter(pk=first.report.pk).update(state="running", heartbeat_at=timezone.now())
    assert request_report(job).report.state == "running"
    with pytest.raises(Refusal) as refused:
        request_report(job, step=21)
    assert refused.value.field == "step"

    running = make_job(alice, tiny_spec(20), state="running")
    owner, colleague, outsider = signed_in(alice), signed_in(bob), signed_in(charlie)
    response = owner.post(f"/api/jobs/{running.pk}/reports", {}, content_type="application/json")
    assert response.status_code == 409 and "running" in response.json()["detail"]
    response = owner.post(f"/api/jobs/{job.pk}/reports", {"step": "x"}, content_type="application/json")
    assert response.status_code == 400 and set(response.json()) == {"step"}
    response = owner.post(f"/api/jobs/{job.pk}/reports", {"step": 99}, content_type="application/json")
    assert response.status_code == 409 and "last checkpoint is at step 20" in response.json()["step"][0]
    response = owner.post(f"/api/jobs/{job.pk}/reports", {}, content_type="application/json")
    assert response.status_code == 200 and response.json()["id"] == first.report.pk
    assert colleague.post(f"/api/jobs/{job.pk}/reports", {}, content_type="application/json").status_code == 403
    assert colleague.get(f"/api/jobs/{job.pk}/reports").json()[0]["id"] == first.report.pk
    assert outsider.post(f"/api/jobs/{job.pk}/reports", {}, content_type="application/json").status_code == 404
    assert outsider.get(f"/api/jobs/{job.pk}/reports").status_code == 404
    assert outsider.post(f"/reports/evaluate/{job.pk}/").status_code == 404
    assert colleague.post(f"/reports/evaluate/{job.pk}/").status_code == 403
    refused_page = owner.post(f"/reports/evaluate/{running.pk}/")
    assert refused_page.status_code == 409 and b"a report needs a job that has stopped" in refused_page.content
    fresh = make_job(alice, tiny_spec(20), name="fresh")
    created = owner.post(f"/reports/evaluate/{fresh.pk}/")
    assert created.status_code == 302 and created["Location"] == f"/reports/{fresh.reports.get().pk}/"
    # Lists: filters are checked and name the parameter.
    assert owner.get("/api/reports?state=done").json() == {
        "state": ["must be one of queued, running, succeeded, failed"]
    }
    assert set(owner.get("/api/reports?job=x").json()) == {"job"}
    assert [r["id"] for r in owner.get(f"/api/reports?job={fresh.pk}").json()] == [fresh.reports.get().pk]
    assert outsider.get("/api/reports").json() == []


@pytest.mark.django_db(transaction=True)  # run_report closes stale connections, as a worker does
def test_a_claim_fences_every_later_write(alice: Any) -> None:
    # The reaper below sends the report's task again once its transaction commits. On the job's queue, the
    # session's real worker (when an earlier test started it) would claim the report before "w2" does: this job
    # trained on a queue that no worker consumes, so the test's claimants are the only ones.
    job = make_job(alice, tiny_spec(20), queue="no-worker-consumes-this")
    report = Report.objects.create(job=job, checkpoint_step=20)
    first = REPORTS.claim(report.pk, "w1")
    assert first is not None and (first.attempt, first.token) == (1, 1)
    assert REPORTS.claim(report.pk, "w2") is None  # running, with a live worker
    # The first worker went silent past REPORT_TIMEOUT_SECONDS: another takes over, and the first writes nothing.
    Report.objects.filter(pk=report.pk).update(heartbeat_at=timezone.now() - timedelta(hours=2))
    assert REPORTS.claim(report.pk, "w2") is None  # silent, but still held until the reaper hands it back
    assert REPORTS.reap() == [report.pk]
    second = REPORTS.claim(report.pk, "w2")
    assert second is not None and (second.attempt, second.token) == (2, 2)
    assert not REPORTS.heartbeat(first)
    assert not REPORTS.finish(first, WorkState.SUCCEEDED)
    assert REPORTS.finish(second, WorkState.FAILED, error="x")
    assert runner.run_report(report.pk, "w3") == {"report": report.pk, "outcome": "not claimable"}


@pytest.mark.django_db(transaction=True)
def test_a_missing_checkpoint_fails_the_report_with_the_reason(alice: Any) -> None:
    job = make_job(alice, tiny_spec(20))
    report = Report.objects.create(job=job, checkpoint_step=20)
    outcome = runner.run_report(report.pk, "w1")
    assert outcome["outcome"] == "failed" and "not on this worker" in outcome["error"]
    report.refresh_from_db()
    assert report.state == "failed" and "keep_checkpoints" in report.error and report.finished_at is not None


@pytest.mark.django_db
def test_pages_and_downloads_are_for_the_owner_and_shared_users_only(
    engine_runs: dict[str, Any], alice: Any, bob: Any, charlie: Any, media_root: Path
) -> None:
    run = engine_runs["causal_lm"]
    job = make_job(alice, run["spec"])
    job.shared_with.add(bob)
    report = finished_report(job, run)
    owner, colleague, outsider = signed_in(alice), signed_in(bob), signed_in(charlie)

    page = owner.get(f"/reports/{report.pk}/")
    assert page.status_code == 200
    html = page.content.decode()
    for section in ("summary", "training", "evaluation", "samples", "routing", "deployment", "artifacts", "spec"):
        assert f'data-section="{section}"' in html
    assert html.count("<svg") == 3 and report.document["checkpoint"]["sha256"] in html
    assert 'aria-current="page">Reports' in html
    listing = owner.get("/reports/").content.decode()
    assert f'data-report-row="{report.pk}"' in listing and "Nothing here yet" not in listing
    assert 'data-testid="no-reports"' in outsider.get("/reports/").content.decode()
    dashboard = owner.get(f"/jobs/{job.pk}/").content.decode()
    assert f'data-report-link="{report.pk}"' in dashboard and "data-evaluate-form hidden" in dashboard

    api = owner.get(f"/api/reports/{report.pk}").json()
    assert api["state"] == "succeeded" and api["metrics"]["perplexity"] == report.document["evaluation"]["perplexity"]
    downloads = {d["name"]: d for d in api["downloads"]}
    assert set(downloads) == {"report.pdf", "report.html", "report.md", "report.json", "model.safetensors",
                              "tokenizer.json", "spec.json", f"job-{job.pk}-tensorboard.tar.gz"}  # fmt: skip
    weights = owner.get(downloads["model.safetensors"]["url"])
    assert weights.status_code == 200
    assert body(weights) == (run["checkpoint"] / "model.safetensors").read_bytes()
    assert f"job-{job.pk}-step-20-model.safetensors" in weights["Content-Disposition"]
    pdf = colleague.get(downloads["report.pdf"]["url"])
    assert pdf.status_code == 200 and pdf["Content-Type"] == "application/pdf" and body(pdf).startswith(b"%PDF")
    assert colleague.get(f"/reports/{report.pk}/playground/").status_code == 200

    # The outsider: 404 on every page, format and artifact, and nothing in the lists.
    urls = [f"/reports/{report.pk}/", f"/reports/{report.pk}/playground/", f"/api/reports/{report.pk}",
            *(d["url"] for d in downloads.values()), f"/api/reports/{report.pk}/artifacts/model.onnx"]  # fmt: skip
    for url in urls:
        assert outsider.get(url).status_code == 404, url
    assert outsider.get("/api/reports").json() == []
    # Unknown names and unfinished reports are 404s with the reason, never a 500.
    assert owner.get(f"/api/reports/{report.pk}/report.exe").status_code == 404
    assert owner.get(f"/api/reports/{report.pk}/artifacts/secrets.txt").status_code == 404
    pending = Report.objects.create(job=make_job(alice, run["spec"], name="pending"), checkpoint_step=20)
    assert owner.get(f"/api/reports/{pending.pk}/report.pdf").status_code == 404
    assert 'data-testid="report-pending"' in owner.get(f"/reports/{pending.pk}/").content.decode()
    assert Client().get(f"/api/reports/{report.pk}").status_code == 401
    assert Client().get(f"/reports/{report.pk}/").status_code == 302


# --------------------------------------------------------------------------------------------------------
# The playground's requests
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x" * 5000}, "prompt"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "temperature": 9}, "temperature"),
        ({"prompt": "a", "temperature": None}, "temperature"),
        ({"prompt": "a", "top_k": -1}, "top_k"),
        ({"prompt": "a", "top_k": 1.5}, "top_k"),
        ({"prompt": "a", "top_k": 10**6}, "top_k"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 10**6}, "max_tokens"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "max_tokens": None}, "max_tokens"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "temprature": 1}, "temprature"),
    ],
)
def test_playground_requests_name_the_bad_field(message: dict[str, Any], field: str) -> None:
    with pytest.raises(Refusal) as error:
        playground.parse_generate(message, vocab_size=260)
    assert error.value.field == field


def test_playground_defaults_and_off_values() -> None:
    request = playground.parse_generate({"prompt": "the", "top_k": 0, "top_p": 1, "max_tokens": 5.0}, 260)
    assert request == playground.GenerateRequest("the", 5, 0.8, None, None, None)
    request = playground.parse_generate({"prompt": "the", "temperature": 0, "top_k": 3, "top_p": 0.5, "seed": 7}, 260)
    assert (request.temperature, request.top_k, request.top_p, request.seed) == (0.0, 3, 0.5, 7)
    assert playground.parse_classify({"prompt": "text"}).text == "text"
    with pytest.raises(Refusal) as error:
        playground.parse_classify({"text": ""})
    assert error.value.field == "text"


# --------------------------------------------------------------------------------------------------------
# The playground's socket, in process (tests/builder/test_reports_worker.py drives it through the ASGI server)
# --------------------------------------------------------------------------------------------------------


def _trained_job(owner: Any, run: dict[str, Any]) -> Job:
    """A job whose folder holds ``run``'s checkpoint, where the runner and the playground look for it."""
    from builder.jobs.files import job_layout

    job = make_job(owner, run["spec"])
    layout = job_layout(job.pk)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.run.root.symlink_to(RunLayout.of_checkpoint(run["checkpoint"]).root, target_is_directory=True)
    return job


async def _talk(
    user: Any, path: str, messages: list[dict[str, Any]], *, one_by_one: bool = True, until: int = 0
) -> list[dict[str, Any]]:
    """Connect as ``user`` and, once the model is ready, send ``messages``: ``one_by_one``, each after the
    previous one's ``done`` or ``error``; otherwise all at once, then read until ``until`` such replies."""
    from channels.routing import URLRouter
    from channels.testing import WebsocketCommunicator

    from builder.reports.routing import websocket_urlpatterns

    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    communicator.scope["user"] = user
    connected, code = await communicator.connect(timeout=30)
    if not connected:
        return [{"type": "refused", "code": code}]
    replies = [await communicator.receive_json_from(timeout=30)]
    if replies[0]["type"] == "loading":
        replies.append(await communicator.receive_json_from(timeout=30))

    async def read_until(ends: int) -> None:
        while ends > 0:
            reply = await communicator.receive_json_from(timeout=30)
            replies.append(reply)
            ends -= reply["type"] in ("done", "error")

    if replies[-1]["type"] == "ready":
        for message in messages:
            await communicator.send_json_to(message)
            if one_by_one:
                await read_until(1)
        if not one_by_one:
            await read_until(until)
    await communicator.disconnect()
    return replies


@pytest.mark.django_db(transaction=True)  # the consumer reads the database from other threads
def test_the_playground_classifies_and_refuses_outsiders(
    engine_runs: dict[str, Any], alice: Any, charlie: Any, media_root: Path
) -> None:
    from asgiref.sync import async_to_sync

    job = _trained_job(alice, engine_runs["classification"])
    replies = async_to_sync(_talk)(
        alice, f"/ws/playground/{job.pk}/", [{"text": "add subtract item"}, {"text": ""}, {"nope": 1}]
    )
    assert replies[0] == {"type": "loading", "checkpoint_step": 12, "report": None}
    ready = replies[1]
    assert ready["type"] == "ready" and ready["task"] == "classification"
    assert sorted(ready["labels"]) == ["$ money <b>", "io", "ops"]
    assert [r["type"] for r in replies[2:5]] == ["start", "labels", "done"]
    probabilities = replies[3]["probabilities"]
    assert {p["label"] for p in probabilities} == set(ready["labels"])
    assert sum(p["p"] for p in probabilities) == pytest.approx(1.0, abs=1e-5)
    assert replies[5] == {"type": "error", "field": "text", "message": "text must be a non-empty string"}
    assert replies[6]["type"] == "error" and replies[6]["field"] == "nope"

    assert async_to_sync(_talk)(charlie, f"/ws/playground/{job.pk}/", []) == [{"type": "refused", "code": 4404}]
    from django.contrib.auth.models import AnonymousUser

    assert async_to_sync(_talk)(AnonymousUser(), f"/ws/playground/{job.pk}/", [])[0]["code"] == 4401


@pytest.mark.django_db(transaction=True)
def test_the_playground_streams_stops_and_names_a_missing_report(
    engine_runs: dict[str, Any], alice: Any, media_root: Path
) -> None:
    from asgiref.sync import async_to_sync

    job = _trained_job(alice, engine_runs["causal_lm"])
    generate = {"prompt": "the expert", "temperature": 0, "max_tokens": 256}
    replies = async_to_sync(_talk)(
        alice, f"/ws/playground/{job.pk}/", [generate, {"type": "stop"}], one_by_one=False, until=1
    )
    kinds = [r["type"] for r in replies]
    assert kinds[:3] == ["loading", "ready", "start"] and kinds[-1] == "done"
    done = replies[-1]
    assert done["tokens"] == kinds.count("token") and done["stopped"] in ("stop", "eos", "max_tokens")
    if done["stopped"] == "stop":
        assert done["tokens"] < 256
    busy = async_to_sync(_talk)(alice, f"/ws/playground/{job.pk}/", [generate, generate], one_by_one=False, until=2)
    assert any(r["type"] == "error" and "already running" in r["message"] for r in busy)
    missing = async_to_sync(_talk)(alice, f"/ws/playground/{job.pk}/?report=999", [])
    assert missing == [{"type": "error", "field": "report", "message": f"job {job.pk} has no report 999"}]
    wrong = async_to_sync(_talk)(alice, f"/ws/playground/{job.pk}/?report=x", [])
    assert wrong == [{"type": "error", "field": "report", "message": "report must be an integer id"}]


@pytest.mark.django_db
def test_an_earlier_checkpoint_can_be_evaluated_while_it_is_kept(
    engine_runs: dict[str, Any], alice: Any, media_root: Path
) -> None:
    job = _trained_job(alice, engine_runs["causal_lm"])
    with pytest.raises(Refusal) as refused:
        request_report(job, user=alice, step=5)
    assert refused.value.field == "step" and str(refused.value).endswith("the job's checkpoints: 10, 20")
    earlier = request_report(job, user=alice, step=10)
    assert earlier.created and earlier.report.checkpoint_step == 10
    assert request_report(job, user=alice).report.checkpoint_step == 20  # a second report: the last checkpoint
