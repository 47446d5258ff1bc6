"""Evaluate one report's checkpoint on this worker: the orchestration behind the thin ``evaluate_report`` task.

Claim the report (durable work, ``builder.reports.work``: queued → running with a fencing token, renewed by a
heartbeat while the worker evaluates),
evaluate the checkpoint on the run's validation data (``workers.engine.evaluate``), export and time the model
(``workers.engine.export``), store the artifacts through Django's storage (local disk or S3), build the document
and its figures, render the stored formats (PDF, one-file HTML, Markdown, JSON), and record the outcome. Every
write after the claim is conditional on the claim still being ours, so a duplicate delivery or a worker that was
presumed dead records nothing. Running again is safe: artifacts are stored under the same names, replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import close_old_connections
from django.urls import reverse
from django.utils import timezone

from builder.core.durable import Heartbeat, WorkState
from builder.core.redaction import describe_failure
from builder.datasets.storage import save_local_file
from builder.jobs.files import job_layout, resolve_data
from builder.jobs.remote import is_mirrored, local_checkpoint
from builder.reports import render
from builder.reports.document import build_document, clean
from builder.reports.models import Report
from builder.reports.serializers import ARTIFACT_FILES, HF_ZIP, REPORT_FILES
from builder.reports.work import REPORTS
from workers.engine.estimate import active_parameters, count_parameters
from workers.engine.spec import load_spec

log = logging.getLogger(__name__)

# Batch sizes timed for the deployment section: one request, and a small batch of them.
LATENCY_BATCHES = (1, 8)


def storage_name(report: Report, name: str) -> str:
    """The storage name of a report's file: stable, so that a second run replaces the first one's files."""
    return f"reports/job-{report.job_id}/report-{report.pk}/{name}"


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def cpu_threads() -> Iterator[int | None]:
    """torch's CPU threads set to ``INFERENCE_CPU_THREADS`` for the block (None when 0: the default), then
    restored: the same worker process trains next."""
    import torch

    wanted = settings.INFERENCE_CPU_THREADS or None
    previous = torch.get_num_threads()
    if wanted is not None:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(previous)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _evaluation_data(report: Report, checkpoint: Path) -> Path:
    """The run's prepared data beside ``checkpoint`` when there is (the same tokenization and split as training),
    else the job's source file (the engine prepares it again and checks the tokenizer comes out the same)."""
    from workers.engine.data import PreparedData
    from workers.engine.layout import RunLayout

    prepared = RunLayout.of_checkpoint(checkpoint).prepared_data
    try:
        PreparedData.load(prepared)
    except FileNotFoundError:
        return resolve_data(report.job, job_layout(report.job_id))
    return prepared


def _store(report: Report, name: str, path: Path, content_type: str) -> dict[str, Any]:
    target = storage_name(report, name)
    default_storage.delete(target)  # a rerun replaces the file (S3 storage would otherwise pick a new name)
    info = {"bytes": path.stat().st_size, "sha256": _sha256(path), "content_type": content_type}
    info["storage"] = save_local_file(target, path, content_type)
    return info


def normalize_evaluation(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's evaluation (``workers.engine.evaluate.evaluate``) in the document's terms: the checkpoint
    without the worker's local path, ``val_ppl`` named ``perplexity``, labels as strings."""
    metrics = raw.get("metrics", {})
    evaluation: dict[str, Any] = {
        "examples": metrics.get("val_examples"),
        "val_loss": metrics.get("val_loss"),
        "settings": raw.get("settings", {}),
    }
    if raw.get("task") == "classification":
        evaluation.update(accuracy=metrics.get("accuracy"), macro_f1=metrics.get("macro_f1"))
        table = raw.get("classification") or {}
        evaluation["confusion"] = {
            "labels": [str(label) for label in table.get("labels", [])],
            "matrix": table.get("confusion", []),
        }
    else:
        evaluation.update(perplexity=metrics.get("val_ppl"), bleu4=metrics.get("bleu4"), rouge_l=metrics.get("rouge_l"))
        if "val_mtp_loss" in metrics:
            evaluation["mtp_loss"] = metrics["val_mtp_loss"]
    checkpoint = raw.get("checkpoint", {})
    spec = load_spec(raw["spec"])
    model: dict[str, Any] = {
        "total_parameters": count_parameters(spec),
        "active_parameters": active_parameters(spec),
        "attention": spec.model.attention,
        "mtp_depth": spec.model.mtp_depth,
        "optimizer": spec.training.optimizer.name,
        "schedule": spec.training.schedule.kind,
    }
    if raw.get("kv_cache"):
        model["kv_cache"] = raw["kv_cache"]
    return {
        "checkpoint": {"step": checkpoint.get("step"), "sha256": checkpoint.get("sha256")},
        "spec": raw.get("spec"),
        "model": model,
        "metrics": evaluation,
        "samples": raw.get("samples", []),
        "routing": raw.get("routing", {}),
    }


def normalize_deployment(latency: Mapping[str, Any], advice: list[dict[str, Any]]) -> dict[str, Any]:
    """``measure_latency``'s report with the variants as an ordered list (``name`` inside), and the advice."""
    variants = [{"name": name, **variant} for name, variant in latency.get("variants", {}).items()]
    return {"settings": latency.get("settings", {}), "variants": variants, "advice": advice}


def run_report(report_id: int, worker: str) -> dict[str, Any]:
    """Claim and compute report ``report_id``; returns a small JSON-able outcome for the task result."""
    close_old_connections()
    taken = REPORTS.claim(report_id, worker)
    if taken is None:
        return {"report": report_id, "outcome": "not claimable"}
    report = Report.objects.select_related("job", "job__owner", "job__dataset").get(pk=report_id)
    began = time.perf_counter()
    try:
        with Heartbeat(REPORTS, taken, settings.JOB_HEARTBEAT_SECONDS):
            outcome = _compute(report)
    except Exception as exc:
        log.exception("report %s failed", report_id)
        message = describe_failure(exc)
        # The reason for the people who read the report; the traceback is in the worker's log (above).
        REPORTS.finish(taken, WorkState.FAILED, error=message)
        return {"report": report_id, "outcome": "failed", "error": message}
    if not REPORTS.finish(taken, WorkState.SUCCEEDED, **outcome):
        return {"report": report_id, "outcome": "claim lost"}
    return {"report": report_id, "outcome": "succeeded", "seconds": round(time.perf_counter() - began, 3)}


def _compute(report: Report) -> dict[str, Any]:
    """Evaluate, export and time the checkpoint, then ``assemble``; returns the fields to record on success."""
    # The job's folder on this worker, or (remote storage) a verified copy of the stored checkpoint: any host.
    checkpoint = local_checkpoint(report.job_id, report.checkpoint_step, all_data=True)
    if not checkpoint.is_dir():
        where = "in storage" if is_mirrored() else "on this worker"
        raise FileNotFoundError(
            f"the checkpoint of step {report.checkpoint_step} is not {where}: only the last "
            "training.keep_checkpoints checkpoints are kept, on the worker that trained the job (and in storage)"
        )
    with cpu_threads() as threads:
        return _measure(report, checkpoint, threads)


def _measure(report: Report, checkpoint: Path, threads: int | None) -> dict[str, Any]:
    """The engine's part, timed phase by phase; ``threads``: the CPU threads latency is measured with."""
    from workers.engine.evaluate import evaluate
    from workers.engine.export import deployment_advice, export_artifacts, measure_latency
    from workers.engine.hf import export_summary

    timings: dict[str, float] = {}
    began = time.perf_counter()
    raw = evaluate(
        checkpoint,
        _evaluation_data(report, checkpoint),
        device=_device(),
        max_examples=settings.REPORT_MAX_EXAMPLES,
        prompts=settings.REPORT_PROMPTS,
        max_new_tokens=settings.REPORT_MAX_NEW_TOKENS,
        seed=0,
    )
    timings["evaluate_s"] = time.perf_counter() - began
    with tempfile.TemporaryDirectory(prefix=f"report-{report.pk}-") as tmp:
        began = time.perf_counter()
        exported = export_artifacts(checkpoint, Path(tmp) / "export")
        # The Hugging Face folder (zipped), or the spec field that keeps every transformers family from loading it.
        huggingface, hf_zip = export_summary(
            checkpoint,
            Path(tmp) / "huggingface",
            tokenizer=exported["tokenizer.json"],
            prefix=f"job-{report.job_id}-step-{report.checkpoint_step}",
        )
        if hf_zip is not None:
            exported = {**exported, HF_ZIP: hf_zip}
        timings["export_s"] = time.perf_counter() - began
        began = time.perf_counter()
        latency = measure_latency(
            checkpoint, onnx_path=exported["model.onnx"], batch_sizes=LATENCY_BATCHES, threads=threads
        )
        advice = deployment_advice(latency)
        timings["latency_s"] = time.perf_counter() - began
        return assemble(
            report,
            evaluation=normalize_evaluation(clean(raw)),
            deployment={**normalize_deployment(clean(latency), clean(advice)), "huggingface": huggingface},
            exported=exported,
            timings=timings,
        )


def assemble(
    report: Report,
    *,
    evaluation: Mapping[str, Any],
    deployment: Mapping[str, Any],
    exported: Mapping[str, Path],
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """Store the exported files, build the document and its figures, render and store every format.

    Returns the report's fields to record: ``document``, ``figures``, ``artifacts`` (name → storage name, size,
    SHA-256, content type) and ``generated_at``. Exported files not in ``ARTIFACT_FILES`` are left out.
    """
    stored: dict[str, dict[str, Any]] = {}
    for name, path in sorted(exported.items()):
        if name in ARTIFACT_FILES:
            stored[name] = _store(report, name, Path(path), ARTIFACT_FILES[name][0])
    artifacts = [
        {
            "name": name,
            "bytes": info["bytes"],
            "sha256": info["sha256"],
            "url": reverse("api-report-artifact", args=(report.pk, name)),
        }
        for name, info in stored.items()
    ]
    document = build_document(
        report, evaluation=evaluation, deployment=deployment, artifacts=artifacts, timings=timings
    )
    figures = render.figures(document)
    generated_at = timezone.now()
    with tempfile.TemporaryDirectory(prefix=f"report-{report.pk}-files-") as tmp:
        for name, content in render.stored_formats(document, figures, generated_at).items():
            path = Path(tmp) / name
            path.write_bytes(content)
            stored[name] = _store(report, name, path, REPORT_FILES[name][0])
    return {"document": document, "figures": figures, "artifacts": stored, "generated_at": generated_at}
