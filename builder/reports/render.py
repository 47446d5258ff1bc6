"""Every format of a report from its stored document and figures: the page, one-file HTML, PDF, Markdown, JSON.

Rendering is a pure function of ``(document, figures, generated_at)``: rendering a report twice gives the same
bytes in every format except where the generation timestamp is written (the PDF's bytes included: weasyprint adds
no date of its own, and the timestamp is given to it as the document's creation date). ``sections`` derives
the tables every format shows from the document, so the page, the PDF and the Markdown cannot disagree.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from django.template.loader import render_to_string

from builder.core.formatting import duration, fixed, human_bytes, num, percent
from builder.reports.document import with_timestamp

REPORT_CSS = Path(__file__).with_name("report.css")
# The order and titles of the sections, shared by every format (and the page's table of contents).
SECTION_TITLES = (
    ("summary", "Summary"),
    ("training", "Training"),
    ("evaluation", "Evaluation"),
    ("samples", "Samples"),
    ("routing", "Routing"),
    ("deployment", "Deployment"),
    ("artifacts", "Artifacts"),
)
FIGURE_TITLES = {
    "training": "Training curves",
    "confusion": "Confusion matrix",
    "routing": "Expert load",
    "latency": "Latency per forward pass",
}
TIMING_LABELS = {"evaluate_s": "evaluation", "export_s": "exports", "latency_s": "latency measurements"}


def figures(document: Mapping[str, Any]) -> dict[str, str]:
    """The report's figures as SVG, by name (``training``, ``routing``, ``latency``, ``confusion``)."""
    from builder.reports import figures as draw  # matplotlib: only the worker draws, never a page view

    training = document.get("training", {})
    markers = [
        {"step": event["step"], "kind": event["kind"]}
        for event in document.get("events", [])
        if event["kind"] in ("intervention", "anomaly", "rollback")
    ]
    routing = document.get("routing", {})
    out = {
        "training": draw.training_curves(training.get("series", {}), markers),
        "routing": draw.routing_heatmap(routing.get("load", []), routing.get("layers", [])),
        "latency": draw.latency_bars(
            [
                {"backend": variant["label"], "batch": row["batch_size"], "ms": row["median_ms"]}
                for variant in document.get("deployment", {}).get("variants", [])
                for row in variant.get("latency", [])
            ]
        ),
    }
    confusion = document.get("evaluation", {}).get("confusion")
    if confusion:
        out["confusion"] = draw.confusion_matrix(confusion["labels"], confusion["matrix"])
    return out


def sections(document: Mapping[str, Any]) -> dict[str, Any]:
    """The rows of every table of the report, as display strings (the same for the page, PDF and Markdown)."""
    job, report = document["job"], document["report"]
    evaluation = document.get("evaluation", {})
    model = document.get("model", {})
    routing = document.get("routing", {})
    deployment = document.get("deployment", {})
    classification = document.get("task") == "classification"
    timings = report.get("timings", {})

    # Durations keep a tenth of a second under a minute (duration(..., 1)): evaluations take seconds.
    summary = [
        ("Job", f"#{job['id']} {job['name']} ({job['state']}, {job['outcome']})"),
        ("Owner", job["owner"]),
        ("Task", "classification" if classification else "language modelling (causal_lm)"),
        ("Dataset", job.get("dataset") or job.get("data_source") or "—"),
        ("Checkpoint", f"step {document['checkpoint']['step']} of {job['total_steps']}"),
        ("Checkpoint SHA-256", document["checkpoint"]["sha256"] or "—"),
        ("Parameters", f"{num(model.get('total_parameters'))} total, {num(model.get('active_parameters'))} active "
                       "per token"),
        ("Training time", f"{duration(job.get('train_seconds'), 1)} over {job['attempts']} attempt(s)"),
        *_training_choices(model),
        ("Submitted / finished", f"{job.get('created_at') or '—'} / {job.get('finished_at') or '—'}"),
        ("Report", f"#{report['id']}, {report['trigger']}; "
                   + ", ".join(f"{TIMING_LABELS.get(k, k)} {duration(v, 1)}" for k, v in timings.items())),
    ]  # fmt: skip
    final = document.get("training", {}).get("final", {})
    training = [
        (name, num(final.get(name)))
        for name in ("loss", "val_loss", "val_ppl", "val_accuracy", "grad_norm", "lr", "tokens_per_s", "tokens_seen")
        if name in final
    ]
    training.append(("best val_loss", num(document.get("training", {}).get("best_val_loss"))))

    if classification:
        metrics = [
            ("Accuracy", percent(evaluation.get("accuracy")), "share of held-out examples labelled correctly"),
            ("Macro-F1", fixed(evaluation.get("macro_f1"), 3), "unweighted mean F1 over the labels present"),
            ("Validation loss", num(evaluation.get("val_loss")), "cross-entropy on the held-out examples"),
        ]
    else:
        metrics = [
            ("Validation loss", num(evaluation.get("val_loss")), "cross-entropy per token on held-out text"),
            ("Perplexity", num(evaluation.get("perplexity")), "exp(validation loss)"),
            ("BLEU-4", fixed(evaluation.get("bleu4"), 2), "sacreBLEU, 0–100, greedy continuations vs references"),
            ("ROUGE-L", fixed(evaluation.get("rouge_l"), 3), "mean F1 of the longest common word subsequence, 0–1"),
        ]
        if "mtp_loss" in evaluation:
            metrics.insert(1, ("MTP loss", num(evaluation.get("mtp_loss")),
                               "multi-token prediction: the MTP modules' cross-entropy on the same text "
                               "(predicting t+2 onwards)"))  # fmt: skip
    metrics.append(("Examples", num(evaluation.get("examples")), "held-out examples scored"))

    layers = routing.get("layers", [])
    dead = {entry["layer"]: entry["experts"] for entry in routing.get("dead_experts", [])}
    routing_rows = [
        (
            f"layer {layer}",
            fixed((routing.get("entropy") or [None] * len(layers))[i], 3),
            fixed((routing.get("max_over_mean") or [None] * len(layers))[i], 2),
            ", ".join(str(e) for e in dead.get(layer, [])) or "none",
            num((routing.get("assignments") or [None] * len(layers))[i]),
        )
        for i, layer in enumerate(layers)
    ]
    dead_count = sum(len(experts) for experts in dead.values())

    latency_rows = [
        (
            variant["label"],
            str(row["batch_size"]),
            fixed(row["median_ms"], 2),
            fixed(row["p90_ms"], 2),
            f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") is not None else "—",
            human_bytes(variant.get("size_bytes")),
        )
        for variant in deployment.get("variants", [])
        for row in variant.get("latency", [])
    ]
    advice = [
        {
            "target": f"≤ {num(entry['target_ms'])} ms",
            "choice": f"{entry['label']}, batch {entry['batch_size']}" if entry.get("variant") else "none meets it",
            "reason": entry.get("reason", ""),
        }
        for entry in deployment.get("advice", [])
    ]
    return {
        "titles": SECTION_TITLES,
        "summary": summary,
        "training": training,
        "metrics": metrics,
        "routing": routing_rows,
        "dead_count": dead_count,
        "dead_threshold": percent(routing.get("dead_threshold"), 2),
        "latency": latency_rows,
        "latency_settings": deployment.get("settings", {}),
        "advice": advice,
        "huggingface": _huggingface_line(deployment.get("huggingface")),
        "kv_cache": _kv_cache_rows(model.get("kv_cache"), document.get("spec", {})),
        "artifacts": [(a["name"], human_bytes(a.get("bytes")), a.get("sha256") or "—", a.get("url")) for a in
                      document.get("artifacts", [])],
    }  # fmt: skip


ATTENTION_NAMES = {"mha": "multi-head", "gqa": "grouped-query", "mla": "multi-head latent (MLA)"}


def _training_choices(model: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Summary rows for the attention, multi-token prediction and optimizer the run used (reports made before
    these were recorded have none)."""
    rows = []
    if "attention" in model:
        rows.append(("Attention", ATTENTION_NAMES.get(model["attention"], model["attention"])))
    if "mtp_depth" in model:
        depth = model["mtp_depth"]
        rows.append(("Multi-token prediction", f"{depth} module(s), ignored by generation" if depth else "none"))
    if "optimizer" in model:
        rows.append(("Optimizer", f"{model['optimizer']}, {model.get('schedule', '—')} schedule"))
    return rows


def _kv_cache_rows(kv: Mapping[str, Any] | None, spec: Mapping[str, Any]) -> list[tuple[str, str, str]] | None:
    """The KV-cache block: (attention, bytes per token, bytes per max_seq_len sequence) for this model and for
    multi-head attention of the same shape; None without a cache (classification, older reports)."""
    if not kv:
        return None
    seq = (spec.get("model") or {}).get("max_seq_len") or 0
    ours, mha = kv["bytes_per_token"], kv["bytes_per_token_mha"]
    rows = [(f"this model: {ATTENTION_NAMES.get(kv['attention'], kv['attention'])}", human_bytes(ours),
             human_bytes(ours * seq))]  # fmt: skip
    if kv["attention"] != "mha":
        ratio = f"{mha / ours:.1f}× more" if ours else "—"
        rows.append((f"multi-head attention, same heads ({ratio})", human_bytes(mha), human_bytes(mha * seq)))
    return rows


def _huggingface_line(export: Mapping[str, Any] | None) -> str | None:
    """One sentence on the Hugging Face export: the family it loads as, or the field that prevents it."""
    if not export:
        return None
    if export.get("field"):
        return f"No Hugging Face export: {export['field']} prevents it ({export.get('reason', '')})."
    return f"huggingface.zip {export.get('reason', '')} (model_type {export.get('family')})."


def context(
    document: Mapping[str, Any], figures_svg: Mapping[str, str], generated_at: datetime, *, links: bool = False
) -> dict[str, Any]:
    """What the report templates (``reports/_report.html``) need. ``links``: make the artifacts links (on the
    site; a downloaded file has no site to link to)."""
    doc = with_timestamp(document, generated_at)
    return {
        "links": links,
        "doc": doc,
        "figures": figures_svg,
        "figure_titles": FIGURE_TITLES,
        "tables": sections(doc),
        "spec_json": json.dumps(doc["spec"], indent=2, ensure_ascii=False),
        "report_css": REPORT_CSS.read_text(),
    }


def render_html(document: Mapping[str, Any], figures_svg: Mapping[str, str], generated_at: datetime) -> str:
    """The report as one self-contained HTML file (styles and figures inline): also the PDF's source."""
    return render_to_string("reports/print.html", context(document, figures_svg, generated_at))


@contextlib.contextmanager
def _quiet_weasyprint() -> Iterator[None]:
    """weasyprint logs every step, and a warning for each SVG presentation property in a ``style`` attribute
    (hundreds per figure) that its HTML style parser does not know; its SVG renderer applies them all the same.
    Only errors are worth the worker's log."""
    loggers = [logging.getLogger(name) for name in ("weasyprint", "weasyprint.progress")]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, previous, strict=True):
            logger.setLevel(level)


def html_to_pdf(html: str) -> bytes:
    with _quiet_weasyprint():
        from weasyprint import HTML  # its import parses its own style sheets, logging as it goes

        pdf: bytes = HTML(string=html).write_pdf()
    return pdf


def render_pdf(document: Mapping[str, Any], figures_svg: Mapping[str, str], generated_at: datetime) -> bytes:
    return html_to_pdf(render_html(document, figures_svg, generated_at))


def render_json(document: Mapping[str, Any], generated_at: datetime) -> str:
    return json.dumps(with_timestamp(document, generated_at), indent=2, ensure_ascii=False) + "\n"


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ").strip() or " "


def _md_table(header: tuple[str, ...], rows: list[tuple[Any, ...]] | list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def render_markdown(document: Mapping[str, Any], generated_at: datetime) -> str:
    """The report in Markdown: the same sections and tables; figures are in the page and the PDF."""
    doc = with_timestamp(document, generated_at)
    tables = sections(doc)
    job = doc["job"]
    out = [
        f"# Evaluation report: {job['name']} (job #{job['id']}, step {doc['checkpoint']['step']})",
        "",
        f"Generated {doc['generated_at']} · schema_version {doc['schema_version']}",
        "",
        "## Summary",
        "",
        *_md_table(("", ""), tables["summary"]),
    ]
    events = doc.get("events", [])
    out += ["### Interventions and anomalies", ""]
    out += [f"- step {e['step']}: {e['summary']}" for e in events] or ["None: the run needed no intervention."]
    out += ["", "## Training", "", *_md_table(("final metric", "value"), tables["training"])]
    out += ["## Evaluation", "", *_md_table(("metric", "value", "meaning"), tables["metrics"])]
    confusion = doc.get("evaluation", {}).get("confusion")
    if confusion:
        header = ("true \\ predicted", *confusion["labels"])
        out += ["### Confusion matrix", ""]
        out += _md_table(header, [[label, *row] for label, row in zip(confusion["labels"], confusion["matrix"],
                                                                           strict=True)])  # fmt: skip
    out += ["## Samples", ""]
    samples = doc.get("samples", [])
    if doc.get("task") == "classification":
        out += _md_table(
            ("text", "label", "predicted"), [(s["text"][:200], s["label"], s["predicted"]) for s in samples]
        )
    else:
        out += _md_table(("prompt", "reference", "output"), [(s["prompt"][-200:], s["reference"], s["output"])
                                                             for s in samples])  # fmt: skip
    out += ["## Routing", "", f"Dead experts: {tables['dead_count']} (load under {tables['dead_threshold']}).", ""]
    out += _md_table(("layer", "balance entropy", "max / mean load", "dead experts", "assignments"), tables["routing"])
    out += ["## Deployment", ""]
    if tables["kv_cache"]:
        out += ["KV cache (fp32, all layers):", "", *_md_table(("attention", "per token", "per sequence"),
                                                                tables["kv_cache"])]  # fmt: skip
    out += _md_table(("variant", "batch", "median ms", "p90 ms", "tokens/s", "size"), tables["latency"])
    out += _md_table(("latency target", "deploy", "why"), [(a["target"], a["choice"], a["reason"])
                                                           for a in tables["advice"]])  # fmt: skip
    out += ["## Artifacts", "", *_md_table(("file", "size", "SHA-256"), [row[:3] for row in tables["artifacts"]])]
    if tables["huggingface"]:
        out += ["", tables["huggingface"]]
    out += ["## Spec", "", "```json", json.dumps(doc["spec"], indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(out)


def stored_formats(
    document: Mapping[str, Any], figures_svg: Mapping[str, str], generated_at: datetime
) -> dict[str, bytes]:
    """The files the worker stores for a report, by name."""
    html = render_html(document, figures_svg, generated_at)
    return {
        "report.pdf": html_to_pdf(html),
        "report.html": html.encode(),
        "report.md": render_markdown(document, generated_at).encode(),
        "report.json": render_json(document, generated_at).encode(),
    }
