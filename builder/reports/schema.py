"""The JSON Schema (draft 2020-12) of ``report.json``, ``schema_version`` 1. Served at ``GET /api/reports/schema``.

A change that removes or renames a field, or changes its meaning, raises ``schema_version``; adding an optional
field does not. Numbers that a run can make non-finite (a diverged loss, an overflowing perplexity) are null.
"""

from __future__ import annotations

from typing import Any

from builder.reports.document import SCHEMA_VERSION

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_INT = {"type": "integer", "minimum": 0}
_INT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_SERIES = {
    "type": "object",
    "required": ["step", "value"],
    "properties": {"step": {"type": "array", "items": _INT}, "value": {"type": "array", "items": _NUMBER_OR_NULL}},
}


def _object(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(properties) if required is None else required,
        "properties": properties,
        **extra,
    }


REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://moe-builder.invalid/schemas/report-v1.json",
    "title": "MoE Builder evaluation report",
    "description": "An evaluation report of one checkpoint of one training job (GET /api/reports/<id>/report.json). "
    "The same report always has the same content except generated_at.",
    "type": "object",
    "required": [
        "schema_version",
        "generated_at",
        "report",
        "job",
        "task",
        "spec",
        "checkpoint",
        "model",
        "training",
        "events",
        "evaluation",
        "samples",
        "routing",
        "deployment",
        "artifacts",
    ],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION, "description": "Raised by every incompatible change."},
        "generated_at": {"type": "string", "format": "date-time", "description": "When this file was rendered."},
        "report": _object(
            {
                "id": _INT,
                "checkpoint_step": _INT,
                "trigger": {"enum": ["automatic", "requested"]},
                "timings": {
                    "type": "object",
                    "description": "Seconds per phase: evaluate_s, export_s, latency_s.",
                    "additionalProperties": {"type": "number"},
                },
            }
        ),
        "job": _object(
            {
                "id": _INT,
                "name": {"type": "string"},
                "owner": {"type": "string"},
                "state": {"type": "string", "description": "The job's state when it was evaluated."},
                "queue": {"type": "string"},
                "dataset": {"type": ["string", "null"], "description": "Name of the dataset (null once deleted)."},
                "data_source": {"type": "string", "description": "Storage name of the training file."},
                "step": _INT,
                "total_steps": _INT,
                "attempts": _INT,
                "created_at": _TIME_OR_NULL,
                "started_at": _TIME_OR_NULL,
                "finished_at": _TIME_OR_NULL,
                "train_seconds": _NUMBER_OR_NULL,
                "outcome": {"type": "string", "description": "Why training ended."},
            }
        ),
        "task": {"enum": ["causal_lm", "classification"]},
        "spec": {"type": "object", "description": "The spec the checkpoint was trained with (GET /api/specs/schema)."},
        "checkpoint": _object({"step": _INT, "sha256": {**_SHA256, "description": "SHA-256 of model.safetensors."}}),
        "model": _object(
            {
                "total_parameters": _INT,
                "active_parameters": _INT,
                "attention": {"enum": ["mha", "gqa", "mla"]},
                "mtp_depth": {**_INT, "description": "Multi-token prediction modules (0: next-token only)."},
                "optimizer": {"enum": ["adamw", "adafactor", "sgd", "muon"]},
                "schedule": {"type": "string", "description": "Learning-rate schedule kind."},
                "kv_cache": _object(
                    {
                        "attention": {"enum": ["mha", "gqa", "mla"]},
                        "bytes_per_token": _INT,
                        "bytes_per_token_mha": {
                            **_INT,
                            "description": "What multi-head attention with the same heads would cache.",
                        },
                    },
                    description="Generation's KV cache per token, fp32, all layers (causal_lm).",
                ),
            },
            required=["total_parameters", "active_parameters"],
        ),
        "training": _object(
            {
                "series": {
                    "type": "object",
                    "description": "Curves up to the checkpoint (loss, val_loss, lr), downsampled to 400 points.",
                    "additionalProperties": _SERIES,
                },
                "final": {
                    "type": "object",
                    "description": "The last value of each metric at or before the checkpoint's step.",
                    "additionalProperties": _NUMBER_OR_NULL,
                },
                "best_val_loss": _NUMBER_OR_NULL,
            }
        ),
        "events": {
            "type": "array",
            "description": "Interventions, anomalies, rollbacks, early stops, resumes and errors, in order.",
            "items": _object(
                {
                    "seq": _INT,
                    "step": _INT,
                    "kind": {"enum": ["intervention", "anomaly", "rollback", "early_stop", "error", "resume"]},
                    "summary": {"type": "string"},
                    "at": _TIME_OR_NULL,
                }
            ),
        },
        "evaluation": _object(
            {
                "examples": _INT,
                "val_loss": _NUMBER_OR_NULL,
                "perplexity": _NUMBER_OR_NULL,
                "bleu4": {**_NUMBER_OR_NULL, "description": "sacreBLEU corpus BLEU-4, 0–100 (causal_lm)."},
                "rouge_l": {**_NUMBER_OR_NULL, "description": "Mean ROUGE-L F1, 0–1 (causal_lm)."},
                "mtp_loss": {
                    **_NUMBER_OR_NULL,
                    "description": "Multi-token prediction: the MTP modules' mean loss on the same batches.",
                },
                "accuracy": {**_NUMBER_OR_NULL, "description": "0–1 (classification)."},
                "macro_f1": {**_NUMBER_OR_NULL, "description": "0–1 (classification)."},
                "confusion": _object(
                    {
                        "labels": {"type": "array", "items": {"type": "string"}},
                        "matrix": {"type": "array", "items": {"type": "array", "items": _INT}},
                    },
                    description="Rows: true label; columns: predicted label (classification).",
                ),
                "settings": {"type": "object", "description": "How the evaluation ran (examples, seed, device)."},
            },
            required=["examples", "val_loss", "settings"],
        ),
        "samples": {
            "type": "array",
            "description": "causal_lm: {prompt, reference, output}; classification: {text, label, predicted, "
            "probabilities}.",
            "items": {
                "oneOf": [
                    _object(
                        {"prompt": {"type": "string"}, "reference": {"type": "string"}, "output": {"type": "string"}}
                    ),
                    _object(
                        {
                            "text": {"type": "string"},
                            "label": {"type": ["string", "integer"]},
                            "predicted": {"type": ["string", "integer"]},
                            "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
                        }
                    ),
                ]
            },
        },
        "routing": _object(
            {
                "layers": {"type": "array", "items": _INT, "description": "Block index of each MoE layer."},
                "num_experts": _INT,
                "assignments": {"type": "array", "items": _INT},
                "load": {
                    "type": "array",
                    "description": "Per MoE layer, each routed expert's share of the layer's assignments.",
                    "items": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
                },
                "dead_threshold": {"type": "number"},
                "dead_experts": {
                    "type": "array",
                    "items": _object({"layer": _INT, "experts": {"type": "array", "items": _INT}}),
                },
                "entropy": {
                    "type": "array",
                    "items": {"type": "number"},
                    "description": "Load entropy / log(E) per layer: 1 = perfectly balanced.",
                },
                "max_over_mean": {"type": "array", "items": {"type": "number"}},
            }
        ),
        "deployment": _object(
            {
                "settings": {"type": "object", "description": "batch_sizes, seq_len, repeats, threads, device."},
                "variants": {
                    "type": "array",
                    "items": _object(
                        {
                            "name": {"enum": ["pytorch_fp32", "pytorch_int8", "onnxruntime_fp32"]},
                            "label": {"type": "string"},
                            "size_bytes": _INT,
                            "latency": {
                                "type": "array",
                                "items": _object(
                                    {
                                        "batch_size": _INT,
                                        "median_ms": {"type": "number"},
                                        "p90_ms": {"type": "number"},
                                        "tokens_per_s": {"type": "number"},
                                    }
                                ),
                            },
                        }
                    ),
                },
                "huggingface": _object(
                    {
                        "family": {"type": ["string", "null"], "description": "transformers model_type."},
                        "architecture": {"type": ["string", "null"], "description": "The from_pretrained class."},
                        "field": {"type": ["string", "null"], "description": "The spec field preventing an export."},
                        "reason": {"type": "string"},
                    },
                    description="The Hugging Face folder (huggingface.zip), or why there is none.",
                ),
                "advice": {
                    "type": "array",
                    "items": _object(
                        {
                            "target_ms": {"type": "number"},
                            "variant": {"type": ["string", "null"]},
                            "label": {"type": ["string", "null"]},
                            "batch_size": _INT_OR_NULL,
                            "p90_ms": _NUMBER_OR_NULL,
                            "median_ms": _NUMBER_OR_NULL,
                            "tokens_per_s": _NUMBER_OR_NULL,
                            "size_bytes": _INT_OR_NULL,
                            "reason": {"type": "string"},
                        },
                        required=["target_ms", "variant", "reason"],
                    ),
                },
            },
            required=["settings", "variants", "advice"],
        ),
        "artifacts": {
            "type": "array",
            "items": _object(
                {
                    "name": {"type": "string"},
                    "bytes": _INT,
                    "sha256": _SHA256,
                    "url": {"type": "string", "description": "Download path on this site (access-checked)."},
                }
            ),
        },
    },
}
