"""The Hugging Face export in a report: the page and the API say which transformers family the model loads as (or
which spec field prevents it), ``huggingface.zip`` downloads for the owner and shared users only, and what it holds
loads with ``from_pretrained`` to the engine's logits.

The runs are real (the engine trains two tiny models here, a second each); the report is assembled as the worker
does (``runner.assemble`` with ``export_summary``'s output), without the worker's latency phase.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from django.utils import timezone

from builder.core.durable import WorkState
from builder.reports import runner
from builder.reports.document import clean
from builder.reports.models import Report
from tests.builder.test_jobs import CORPUS, tiny_spec
from tests.builder.test_reports import body, latency_report, make_job
from tests.conftest import signed_in
from workers.engine.evaluate import evaluate, load_for_inference
from workers.engine.export import deployment_advice
from workers.engine.hf import export_summary
from workers.engine.sinks import MemorySink
from workers.engine.spec import load_spec
from workers.engine.train import train


def sigmoid_spec() -> dict[str, Any]:
    """tiny_spec with DeepSeek-V3 routing and standard attention: GLM-4-MoE's family."""
    spec = tiny_spec(10)
    spec["model"]["moe"].update(scoring="sigmoid", balancing="aux_free")
    return spec


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """``{"glm4_moe" | "none": {"checkpoint", "evaluation", "spec"}}``: a run each family-less and GLM-shaped."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hf-report-runs")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    out = {}
    try:
        for name, spec_dict in (("glm4_moe", sigmoid_spec()), ("none", tiny_spec(10))):
            result = train(load_spec(spec_dict), corpus, root / name, MemorySink(), device="cpu")
            assert result.checkpoint is not None
            raw = evaluate(result.checkpoint, root / name / "data", max_examples=16, prompts=2, max_new_tokens=4)
            out[name] = {"checkpoint": result.checkpoint, "evaluation": raw, "spec": spec_dict}
        yield out
    finally:
        torch.set_num_threads(previous)


def hf_report(job: Any, run: dict[str, Any], work: Path) -> Report:
    """The job's report as the worker records it, with the Hugging Face export (the latency figures are fixed)."""
    report = Report.objects.create(job=job, checkpoint_step=job.last_checkpoint_step, state="running", attempts=1)
    checkpoint: Path = run["checkpoint"]
    tokenizer = checkpoint.parent.parent / "data" / "tokenizer.json"
    summary, archive = export_summary(checkpoint, work, tokenizer=tokenizer, prefix=f"job-{job.pk}")
    exported = {"model.safetensors": checkpoint / "model.safetensors", "tokenizer.json": tokenizer}
    if archive is not None:
        exported["huggingface.zip"] = archive
    latency = latency_report(run["spec"])
    fields = runner.assemble(
        report,
        evaluation=runner.normalize_evaluation(clean(run["evaluation"])),
        deployment={**runner.normalize_deployment(clean(latency), clean(deployment_advice(latency))),
                    "huggingface": summary},
        exported=exported,
        timings={"evaluate_s": 0.5, "export_s": 1.0},
    )  # fmt: skip
    Report.objects.filter(pk=report.pk).update(state=WorkState.SUCCEEDED, finished_at=timezone.now(), **fields)
    report.refresh_from_db()
    return report


@pytest.mark.django_db
def test_the_report_offers_a_folder_that_transformers_loads_to_the_engines_logits_and_only_to_its_readers(
    runs: dict[str, Any], alice: Any, bob: Any, charlie: Any, media_root: Path, tmp_path: Path
) -> None:
    run = runs["glm4_moe"]
    job = make_job(alice, run["spec"])
    job.shared_with.add(bob)
    report = hf_report(job, run, tmp_path / "export")
    owner, colleague, outsider = signed_in(alice), signed_in(bob), signed_in(charlie)

    page = owner.get(f"/reports/{report.pk}/").content.decode()
    assert 'data-huggingface="glm4_moe"' in page and "Glm4MoeForCausalLM" in page
    api = owner.get(f"/api/reports/{report.pk}").json()
    assert api["huggingface"]["family"] == "glm4_moe" and api["huggingface"]["field"] is None
    downloads = {d["name"]: d for d in api["downloads"]}
    assert downloads["huggingface.zip"]["content_type"] == "application/zip"
    markdown = body(owner.get(downloads["report.md"]["url"])).decode()
    assert "Glm4MoeForCausalLM" in markdown

    answer = colleague.get(downloads["huggingface.zip"]["url"])
    assert answer.status_code == 200 and answer["Content-Type"] == "application/zip"
    assert outsider.get(downloads["huggingface.zip"]["url"]).status_code == 404
    with zipfile.ZipFile(io.BytesIO(body(answer))) as archive:
        names = set(archive.namelist())
        assert {f"job-{job.pk}/{n}" for n in ("config.json", "model.safetensors", "tokenizer.json")} <= names
        archive.extractall(tmp_path / "unzipped")

    folder = tmp_path / "unzipped" / f"job-{job.pk}"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    engine = load_for_inference(run["checkpoint"]).model.eval()
    assert tok("the expert")["input_ids"] == list(b"the expert")  # the run's byte tokenizer
    # Random ids over the whole vocabulary: the trained routers favour some experts on corpus text.
    ids = torch.randint(0, 259, (64, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = engine(ids)
        delta = (hf(ids).logits - out.logits).abs().max().item()
    assert bool((out.expert_load > 0).all())  # every expert of every layer gets some of these tokens
    assert delta < 1e-4


@pytest.mark.django_db
def test_a_model_no_family_expresses_shows_the_field_instead_of_a_download(
    runs: dict[str, Any], alice: Any, media_root: Path, tmp_path: Path
) -> None:
    run = runs["none"]  # softmax scoring with aux-free balancing (the spec defaults)
    report = hf_report(make_job(alice, run["spec"]), run, tmp_path / "export")
    owner = signed_in(alice)
    page = owner.get(f"/reports/{report.pk}/").content.decode()
    assert 'data-huggingface="none"' in page and "model.moe.balancing prevents it" in page
    api = owner.get(f"/api/reports/{report.pk}").json()
    assert api["huggingface"]["field"] == "model.moe.balancing" and api["huggingface"]["family"] is None
    assert "huggingface.zip" not in {d["name"] for d in api["downloads"]}
    assert owner.get(f"/api/reports/{report.pk}/artifacts/huggingface.zip").status_code == 404
