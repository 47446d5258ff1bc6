from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET

from builder.core.health import check_all, health_table_context

# The home page's steps, in the order a person takes them: (title, what it does, the page's URL name).
SECTIONS = (
    (
        "Configure",
        "Build a model configuration with the wizard, edit it as JSON against the schema, "
        "or compare 2–4 configurations by predicted parameters, memory and time.",
        "configs:index",
    ),
    ("Datasets", "Upload, validate, clean and inspect training data; built-in demo corpora.", "datasets:list"),
    ("Jobs", "Launch training on Celery workers and watch loss, gradients and expert load live.", "jobs:list"),
    (
        "Reports",
        "Evaluation reports (perplexity, BLEU, ROUGE, latency) with PDF and weight downloads, and a playground.",
        "reports:list",
    ),
)


@login_required
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "core/home.html", {"sections": SECTIONS})


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
        health_table_context(report),
        status=200 if report["status"] == "ok" else 503,
    )


@csrf_exempt  # it changes nothing; a POST without a CSRF token must get this 404, not the HTML CSRF page
def api_not_found(request: HttpRequest) -> JsonResponse:
    """Any URL under ``/api/`` that names no operation: 404 in the API's shape (``{"detail"}``, JSON), never
    Django's HTML page, so that a client reading JSON can read this answer too."""
    return JsonResponse({"detail": f"no API operation at {request.path}"}, status=404)
