"""The checkpoints pages: your imported Hugging Face folders (upload, list), one checkpoint (its family, files and
derived spec), and "Save as a configuration" to launch jobs from it. Anyone else's checkpoint is a 404."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from builder.checkpoints.services import get_own_checkpoint, import_checkpoint, own_checkpoints
from builder.configs.models import VersionSource
from builder.configs.services import create_config
from builder.core.errors import Refusal
from workers.engine.spec import load_spec


@login_required
def checkpoint_list(request: HttpRequest) -> HttpResponse:
    """GET: the list and the upload form; POST (multipart): import, then open the new checkpoint."""
    errors: list[str] = []
    status = 200
    if request.method == "POST":
        try:
            checkpoint = import_checkpoint(request.user, request.POST.get("name", ""), request.FILES.getlist("files"))
        except Refusal as refusal:
            errors = [f"{e.path}: {e.message}" if e.path else e.message for e in refusal.errors]
            status = refusal.status
        else:
            return redirect("checkpoints:detail", checkpoint_id=checkpoint.pk)
    context = {"checkpoints": own_checkpoints(request.user), "errors": errors}
    return render(request, "checkpoints/list.html", context, status=status)


@login_required
def checkpoint_detail(request: HttpRequest, checkpoint_id: int) -> HttpResponse:
    checkpoint = get_own_checkpoint(request.user, checkpoint_id)
    context = {
        "checkpoint": checkpoint,
        "spec_json": json.dumps(checkpoint.spec, indent=2),
        "jobs": checkpoint.jobs.order_by("-created_at")[:50],
    }
    return render(request, "checkpoints/detail.html", context)


@login_required
@require_POST
def save_as_config(request: HttpRequest, checkpoint_id: int) -> HttpResponse:
    """A configuration whose version 1 is the derived spec; then the launch form, starting from the checkpoint."""
    checkpoint = get_own_checkpoint(request.user, checkpoint_id)
    name = (request.POST.get("name") or f"{checkpoint.name} (imported)")[:200]
    try:
        config = create_config(
            request.user, name, f"Starts from imported checkpoint #{checkpoint.pk} ({checkpoint.architecture}).",
            load_spec(checkpoint.spec), source=VersionSource.TEMPLATE, note="derived from config.json",
        )  # fmt: skip
    except Refusal as refusal:
        context = {
            "checkpoint": checkpoint,
            "spec_json": json.dumps(checkpoint.spec, indent=2),
            "jobs": checkpoint.jobs.order_by("-created_at")[:50],
            "errors": [e.message for e in refusal.errors],
        }
        return render(request, "checkpoints/detail.html", context, status=refusal.status)
    version = config.versions.get(number=1)
    query = urlencode({"config_version": version.pk, "init_checkpoint": checkpoint.pk})
    return redirect(f"{reverse('jobs:launch')}?{query}")
