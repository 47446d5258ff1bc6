"""The report document: everything a report says, as one JSON-able dict (the ``report.json`` format).

``build_document`` runs once, on the worker, when the evaluation is done: it snapshots the job (spec, timings,
curves, interventions and anomalies) next to what the engine measured (metrics, samples, routing, latency,
advice) and the artifacts stored. The result is stored on the report row without ``generated_at``; every format
(page, PDF, Markdown, JSON) is rendered from that stored document, so the same report always renders the same
bytes but for the generation timestamp. Its structure is ``builder.reports.schema.REPORT_SCHEMA``.

Numbers from the engine pass through ``_finite``: NaN and infinities (a diverged run) become null, which JSON can
carry and every format shows as "—".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from builder.jobs import history
from builder.jobs.models import Job, JobEvent, MetricPoint
from builder.reports.models import Report

SCHEMA_VERSION = 1
# Points per curve in the document (and so in the figures): enough for the shape, small enough for a PDF.
CURVE_POINTS = 400
CURVES = ("loss", "val_loss", "mtp_loss", "lr")
# The events a reader of the report cares about: what the trainer did on its own, and what went wrong.
NOTABLE_EVENTS = ("intervention", "anomaly", "rollback", "early_stop", "error", "resume")
FINAL_METRICS = (
    "loss",
    "val_loss",
    "val_ppl",
    "val_accuracy",
    "mtp_loss",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "tokens_seen",
)


def iso(moment: datetime) -> str:
    """``2026-12-01T14:26:46Z``: UTC to the second (what a person reads; finer is noise in a report)."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def iso_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else iso(moment)


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def clean(value: Any) -> Any:
    """``value`` with every float finite or None, tuples as lists and keys as strings (what JSON carries)."""
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if hasattr(value, "item"):  # NumPy / torch scalars
        return clean(value.item())
    if isinstance(value, float):
        return _finite(value)
    return str(value)


def describe_event(kind: str, data: Mapping[str, Any]) -> str:
    """One sentence for a person, as the live dashboard says it (frontend/src/jobs.js ``describeEvent``)."""
    if kind == "intervention":
        changes = ", ".join(
            f"{name} {_num(change.get('before'))} → {_num(change.get('after'))}"
            for name, change in (data.get("changes") or {}).items()
            if isinstance(change, Mapping)
        )
        reason = f" ({data['reason']})" if data.get("reason") else ""
        return f"plateau intervention{reason}: {changes or 'no change'}"
    if kind == "anomaly":
        loss = f" (loss {_num(data.get('loss'))})" if data.get("loss") is not None else ""
        action = f", {data['action']}" if data.get("action") else ""
        return f"anomaly: {data.get('reason') or data.get('kind') or 'loss spike'}{loss}{action}"
    if kind == "rollback":
        reason = f": {data['reason']}" if data.get("reason") else ""
        return f"rolled back to step {data.get('step')}{reason}"
    if kind == "early_stop":
        return f"early stop: {data.get('reason') or 'no improvement'}"
    if kind == "resume":
        return f"resumed from the checkpoint of step {data.get('step')}"
    if kind == "error":
        return f"error: {data.get('message', '')}"
    return kind


def _num(value: Any) -> str:
    number = _finite(value)
    if number is None:
        return "—"
    return f"{number:.3g}" if abs(number) < 1e-2 or abs(number) >= 1e4 else f"{number:.4g}"


def job_facts(job: Job, step: int) -> dict[str, Any]:
    """What the job's record says up to checkpoint ``step``: curves, final values, notable events, timings."""
    record = history.history(job, max_points=CURVE_POINTS, names=list(CURVES))["series"]
    series: dict[str, dict[str, list[Any]]] = {
        name: {
            "step": [int(s) for s, _ in zip(data["step"], data["value"], strict=True) if s <= step],
            "value": [_finite(v) for s, v in zip(data["step"], data["value"], strict=True) if s <= step],
        }
        for name, data in sorted(record.items())
    }
    final: dict[str, float | None] = {}
    for name in FINAL_METRICS:
        value = (
            MetricPoint.objects.filter(job=job, name=name, step__lte=step)
            .order_by("-step")
            .values_list("value", flat=True)
            .first()
        )
        if value is not None:
            final[name] = _finite(value)
    val_series = series["val_loss"]["value"] if "val_loss" in series else []
    val_losses = [v for v in val_series if v is not None]
    events = [
        {
            "seq": event.seq,
            "step": event.step or int(event.data.get("step") or 0),
            "kind": event.kind,
            "summary": describe_event(event.kind, event.data),
            "at": iso_or_none(event.created_at),
        }
        for event in JobEvent.objects.filter(job=job, kind__in=NOTABLE_EVENTS).order_by("seq")
    ]
    return {
        "series": series,
        "final": final,
        "best_val_loss": min(val_losses) if val_losses else None,
        "events": events,
    }


def build_document(
    report: Report,
    *,
    evaluation: Mapping[str, Any],
    deployment: Mapping[str, Any],
    artifacts: Sequence[Mapping[str, Any]],
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """The report document (without ``generated_at``) of ``report`` from what the worker measured.

    ``evaluation``: ``{"checkpoint": {"step", "sha256"}, "model": {...}, "metrics": {...}, "samples": [...],
    "routing": {...}}`` (``runner.normalize_evaluation``); ``deployment``: ``{"latency": [...], "sizes": [...],
    "advice": [...]}``; ``artifacts``: ``[{"name", "bytes", "sha256", "url"}]``; ``timings``: seconds per phase.
    """
    job = report.job
    facts = job_facts(job, report.checkpoint_step)
    dataset = job.dataset.name if job.dataset is not None else None
    document = {
        "schema_version": SCHEMA_VERSION,
        "report": {
            "id": report.pk,
            "checkpoint_step": report.checkpoint_step,
            "trigger": report.trigger,
            "timings": {name: round(float(value), 3) for name, value in timings.items()},
        },
        "job": {
            "id": job.pk,
            "name": job.name,
            "owner": job.owner.get_username(),
            "state": job.state,
            "queue": job.queue,
            "dataset": dataset,
            "data_source": job.data_source,
            "step": job.step,
            "total_steps": job.total_steps,
            "attempts": job.attempts,
            "created_at": iso_or_none(job.created_at),
            "started_at": iso_or_none(job.started_at),
            "finished_at": iso_or_none(job.finished_at),
            "train_seconds": _finite((job.result or {}).get("train_seconds")),
            "outcome": (job.result or {}).get("reason") or (job.result or {}).get("status") or job.state,
        },
        "task": job.spec.get("model", {}).get("task", "causal_lm"),
        "spec": evaluation.get("spec") or job.spec,
        "checkpoint": evaluation["checkpoint"],
        "model": evaluation.get("model", {}),
        "training": {"series": facts["series"], "final": facts["final"], "best_val_loss": facts["best_val_loss"]},
        "events": facts["events"],
        "evaluation": evaluation["metrics"],
        "samples": evaluation.get("samples", []),
        "routing": evaluation["routing"],
        "deployment": dict(deployment),
        "artifacts": list(artifacts),
    }
    cleaned: dict[str, Any] = clean(document)
    return cleaned


def with_timestamp(document: Mapping[str, Any], generated_at: datetime) -> dict[str, Any]:
    """The document as served: ``schema_version`` and ``generated_at`` first, then the stored content."""
    return {"schema_version": document["schema_version"], "generated_at": iso(generated_at), **document}
