"""The playground's pieces that are not websocket plumbing: which checkpoint a job's playground runs, loading it,
and validating a request.

A request is checked field by field before anything runs; a ``Refusal`` names the field at fault, so the
socket answers ``{"type": "error", "field", "message"}`` and stays open. Bounds come from settings
(``PLAYGROUND_MAX_NEW_TOKENS``, ``PLAYGROUND_MAX_PROMPT_CHARS``) and from the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from builder.core.durable import WorkState
from builder.core.errors import Refusal
from builder.jobs.models import Job
from builder.jobs.remote import local_checkpoint
from builder.reports.models import Report

MAX_TEMPERATURE = 5.0  # workers.engine.evaluate.MAX_TEMPERATURE (not imported here: that module imports torch)


@dataclass(frozen=True)
class Source:
    """What a playground connection runs: the checkpoint of ``step`` of ``job``, described by ``report``."""

    job_id: int
    step: int
    report_id: int | None


def find_source(job: Job, report_id: int | None) -> Source:
    """The checkpoint to load: the given report's, else the job's newest succeeded report's, else the job's last
    checkpoint. Raises ``Refusal`` (field ``report``) when there is none or the report is not the job's."""
    report: Report | None
    if report_id is not None:
        report = Report.objects.filter(pk=report_id, job=job).first()
        if report is None:
            raise Refusal("report", f"job {job.pk} has no report {report_id}")
    else:
        succeeded = Report.objects.filter(job=job, state=WorkState.SUCCEEDED)
        report = succeeded.order_by("-checkpoint_step").first()
    step = report.checkpoint_step if report is not None else job.last_checkpoint_step
    if step is None:
        raise Refusal("report", "this job has no checkpoint yet")
    return Source(job.pk, step, report.pk if report else None)


def load(source: Source) -> Any:
    """The ``workers.engine.evaluate.Inference`` of ``source`` on this machine's CPU (slow: run it off the event
    loop). The checkpoint is read from ``JOBS_WORK_DIR``, which the web server shares with the worker that
    trained the job on a single machine, or (remote storage) from a verified copy of the stored checkpoint
    (``builder.jobs.remote.local_checkpoint``: fetched once, then cached on this host)."""
    import torch

    from workers.engine.evaluate import load_for_inference

    if settings.INFERENCE_CPU_THREADS:
        # Process-wide, and this process (the web server) runs no other model: see INFERENCE_CPU_THREADS.
        torch.set_num_threads(settings.INFERENCE_CPU_THREADS)
    checkpoint = local_checkpoint(source.job_id, source.step)
    if not checkpoint.is_dir():
        raise Refusal(
            "report",
            f"the checkpoint of step {source.step} is not on this server (the playground reads the trained "
            "checkpoint from JOBS_WORK_DIR, which the worker that trained the job must share, or from storage)",
        )
    return load_for_inference(checkpoint, "cpu")


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None


@dataclass(frozen=True)
class ClassifyRequest:
    text: str


def _number(message: dict[str, Any], field: str, default: float | None, low: float, high: float, integer: bool) -> Any:
    value = message.get(field, default)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        raise Refusal(field, f"{field} must be {kind}, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        bounds = (int(low), int(high)) if integer else (f"{low:g}", f"{high:g}")  # 2**53 in full, not 9.0072e+15
        raise Refusal(field, f"{field} must be between {bounds[0]} and {bounds[1]}, got {value!r}")
    return int(value) if integer else float(value)


def _text(message: dict[str, Any], field: str) -> str:
    value = message.get(field)
    if not isinstance(value, str) or not value.strip():
        raise Refusal(field, f"{field} must be a non-empty string")
    limit = settings.PLAYGROUND_MAX_PROMPT_CHARS
    if len(value) > limit:
        raise Refusal(field, f"{field} is {len(value)} characters long; the limit is {limit}")
    return value


def parse_generate(message: dict[str, Any], vocab_size: int) -> GenerateRequest:
    """``{prompt, temperature = 0.8, top_k = null, top_p = null, max_tokens = 64, seed = null}``.

    ``top_k`` 0 and ``top_p`` 1 mean off, as null does.
    """
    known = {"type", "prompt", "temperature", "top_k", "top_p", "max_tokens", "seed"}
    unknown = sorted(set(message) - known)
    if unknown:
        raise Refusal(unknown[0], f"unknown field {unknown[0]!r}; expected {', '.join(sorted(known))}")
    prompt = _text(message, "prompt")
    max_tokens = _number(message, "max_tokens", 64, 1, settings.PLAYGROUND_MAX_NEW_TOKENS, integer=True)
    if max_tokens is None:
        raise Refusal("max_tokens", "max_tokens must be an integer")
    temperature = _number(message, "temperature", 0.8, 0.0, MAX_TEMPERATURE, integer=False)
    if temperature is None:
        raise Refusal("temperature", "temperature must be a number (0 for greedy decoding)")
    top_k = _number(message, "top_k", 0, 0, vocab_size, integer=True)
    top_p = _number(message, "top_p", 1.0, 0.0, 1.0, integer=False)
    if top_p is not None and top_p <= 0:
        raise Refusal("top_p", "top_p must be above 0 (1 keeps every token)")
    seed = _number(message, "seed", None, 0, 2**53, integer=True)
    return GenerateRequest(
        prompt=prompt,
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k or None,
        top_p=None if top_p is None or top_p >= 1.0 else top_p,
        seed=seed,
    )


def parse_classify(message: dict[str, Any]) -> ClassifyRequest:
    """``{text}`` (``prompt`` is accepted too, so one form serves both kinds of model)."""
    known = {"type", "text", "prompt", "temperature", "top_k", "top_p", "max_tokens", "seed"}
    unknown = sorted(set(message) - known)
    if unknown:
        raise Refusal(unknown[0], f"unknown field {unknown[0]!r}")
    field = "text" if "text" in message else "prompt"
    return ClassifyRequest(text=_text(message, field))
