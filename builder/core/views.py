from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from builder.core.health import check_all

# The navigation's sections. Each says plainly what it will hold until its app exists: no fake data.
SECTIONS = {
    "configure": (
        "Configure",
        "Build a model configuration with the wizard, edit it as JSON against the schema, "
        "or compare 2–4 configurations by predicted parameters, memory and time.",
    ),
    "datasets": ("Datasets", "Upload, validate, clean and inspect training data; built-in demo corpora."),
    "jobs": ("Jobs", "Launch training on Celery workers and watch loss, gradients and expert load live."),
    "reports": (
        "Reports",
        "Evaluation reports (perplexity, BLEU, ROUGE, latency) with PDF and weight downloads.",
    ),
}


@login_required
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "core/home.html", {"sections": SECTIONS})


@login_required
def section(request: HttpRequest, name: str) -> HttpResponse:
    if name not in SECTIONS:
        raise Http404("no such section")
    title, purpose = SECTIONS[name]
    return render(request, "core/section.html", {"name": name, "title": title, "purpose": purpose})


@require_GET
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """Machine-readable health: 200 when every service is ok, 503 otherwise. Public (no secrets in it)."""
    report = check_all()
    return JsonResponse(report, status=200 if report["status"] == "ok" else 503)


@login_required
@never_cache
def status(request: HttpRequest) -> HttpResponse:
    report = check_all()
    return render(
        request,
        "core/status.html",
        {"report": report},
        status=200 if report["status"] == "ok" else 503,
    )
