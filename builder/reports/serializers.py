"""What the API says about a report (the report document itself is a download: ``report.json``)."""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from builder.core.durable import WorkState
from builder.reports.models import Report

# The files a report stores besides the model's artifacts, in the order the pages list them.
REPORT_FILES = {
    "report.pdf": ("application/pdf", "PDF"),
    "report.html": ("text/html; charset=utf-8", "HTML (one file)"),
    "report.md": ("text/markdown; charset=utf-8", "Markdown"),
    "report.json": ("application/json", "JSON"),
}
# The model's artifacts, as the worker's export names them.
ARTIFACT_FILES = {
    "model.safetensors": ("application/octet-stream", "Weights (safetensors)"),
    "tokenizer.json": ("application/json", "Tokenizer (tokenizers JSON)"),
    "model.onnx": ("application/octet-stream", "ONNX model"),
    "model.onnx.data": ("application/octet-stream", "ONNX external weights (models over 2 GB)"),
    "spec.json": ("application/json", "Spec (JSON)"),
    "labels.json": ("application/json", "Labels of a classifier's outputs (JSON)"),
    "huggingface.zip": ("application/zip", "Hugging Face folder (zip): config.json, model.safetensors, tokenizer"),
}
HF_ZIP = "huggingface.zip"  # a folder that transformers loads with from_pretrained (workers/engine/hf.py)


def download_links(report: Report) -> list[dict[str, Any]]:
    """Every download of a succeeded report (none before): the report's formats, the model's artifacts and the
    job's TensorBoard logs, each with its URL (relative to the site), size and SHA-256 where known."""
    if report.state != WorkState.SUCCEEDED:
        return []
    links = []
    for name, (content_type, title) in {**REPORT_FILES, **ARTIFACT_FILES}.items():
        stored = report.artifacts.get(name)
        if not stored:
            continue
        view = "api-report-file" if name in REPORT_FILES else "api-report-artifact"
        links.append(
            {
                "name": name,
                "title": title,
                "kind": "report" if name in REPORT_FILES else "artifact",
                "url": reverse(view, args=(report.pk, name)),
                "bytes": stored.get("bytes"),
                "sha256": stored.get("sha256"),
                "content_type": content_type,
            }
        )
    links.append(
        {
            "name": f"job-{report.job_id}-tensorboard.tar.gz",
            "title": "TensorBoard logs (tar.gz)",
            "kind": "artifact",
            "url": reverse("api-job-tensorboard", args=(report.job_id,)),
            "bytes": None,
            "sha256": None,
            "content_type": "application/gzip",
        }
    )
    return links


class DownloadSerializer(serializers.Serializer[dict[str, Any]]):
    name = serializers.CharField()
    title = serializers.CharField()
    kind = serializers.ChoiceField(choices=["report", "artifact"])
    url = serializers.CharField()
    bytes = serializers.IntegerField(allow_null=True)
    sha256 = serializers.CharField(allow_null=True)
    content_type = serializers.CharField()


class MetricsSerializer(serializers.Serializer[dict[str, Any]]):
    val_loss = serializers.FloatField(required=False, allow_null=True)
    perplexity = serializers.FloatField(required=False, allow_null=True)
    bleu4 = serializers.FloatField(required=False, allow_null=True, help_text="causal_lm: BLEU-4, 0–100.")
    rouge_l = serializers.FloatField(required=False, allow_null=True, help_text="causal_lm: ROUGE-L F1, 0–1.")
    accuracy = serializers.FloatField(required=False, allow_null=True, help_text="classification, 0–1.")
    macro_f1 = serializers.FloatField(required=False, allow_null=True, help_text="classification, 0–1.")


class HuggingFaceSerializer(serializers.Serializer[dict[str, Any]]):
    family = serializers.CharField(
        allow_null=True, help_text="transformers model_type: deepseek_v3, deepseek_v2, glm4_moe or qwen2_moe."
    )
    architecture = serializers.CharField(allow_null=True, help_text="The class from_pretrained builds.")
    field = serializers.CharField(allow_null=True, help_text="The spec field no family can express (no export).")
    reason = serializers.CharField()


class ReportSerializer(serializers.ModelSerializer[Report]):
    job_name = serializers.CharField(source="job.name", read_only=True)
    owner = serializers.CharField(source="job.owner.username", read_only=True)
    task = serializers.SerializerMethodField(help_text="causal_lm or classification (from the job's spec).")
    metrics = serializers.SerializerMethodField(
        help_text="The headline metrics (null until the report succeeds): val_loss, perplexity, bleu4, rouge_l, "
        "accuracy, macro_f1, as they apply to the task."
    )
    page = serializers.SerializerMethodField(help_text="The report's page on this site.")
    playground = serializers.SerializerMethodField(help_text="The playground page (succeeded reports only).")
    downloads = serializers.SerializerMethodField()
    huggingface = serializers.SerializerMethodField(
        help_text="The Hugging Face export (succeeded reports only): the family transformers loads huggingface.zip "
        "as, or the spec field that prevents an export."
    )

    class Meta:
        model = Report
        fields = [
            "id", "job", "job_name", "owner", "task", "checkpoint_step", "trigger", "state", "error", "attempts",
            "created_at", "started_at", "finished_at", "generated_at", "metrics", "page", "playground", "downloads",
            "huggingface",
        ]  # fmt: skip
        read_only_fields = fields

    def get_task(self, report: Report) -> str:
        return str(report.job.spec.get("model", {}).get("task", "causal_lm"))

    @extend_schema_field(MetricsSerializer(allow_null=True))
    def get_metrics(self, report: Report) -> dict[str, float | None] | None:
        if report.state != WorkState.SUCCEEDED:
            return None
        metrics = report.document.get("evaluation", {})
        keys = ("val_loss", "perplexity", "bleu4", "rouge_l", "accuracy", "macro_f1")
        return {key: metrics.get(key) for key in keys if key in metrics}

    def get_page(self, report: Report) -> str:
        return reverse("reports:detail", args=(report.pk,))

    def get_playground(self, report: Report) -> str | None:
        return reverse("reports:playground", args=(report.pk,)) if report.state == WorkState.SUCCEEDED else None

    @extend_schema_field(DownloadSerializer(many=True))
    def get_downloads(self, report: Report) -> list[dict[str, Any]]:
        return download_links(report)

    @extend_schema_field(HuggingFaceSerializer(allow_null=True))
    def get_huggingface(self, report: Report) -> dict[str, Any] | None:
        if report.state != WorkState.SUCCEEDED:
            return None
        found: dict[str, Any] | None = report.document.get("deployment", {}).get("huggingface")
        return found  # None for reports made before the export existed


class ReportRequestSerializer(serializers.Serializer[dict[str, Any]]):
    """``POST /api/jobs/<id>/reports``: which checkpoint to evaluate (default: the job's last one)."""

    step = serializers.IntegerField(
        required=False,
        min_value=0,
        help_text="The checkpoint step to evaluate; default the job's last committed checkpoint. Only checkpoints "
        "the trainer kept on disk (training.keep_checkpoints) can be evaluated.",
    )
