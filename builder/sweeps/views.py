"""The sweeps pages: the list, the live page of one sweep (trials table, objective over trials, parallel
coordinates, parameter importances, stop, save the best trial), and the wizard's "let the platform tune the learning
rate" (a small sweep around a saved configuration). The sweep page is server-rendered around the sweep's snapshot;
``frontend/src/sweeps.js`` keeps it current from the websocket (``/ws/sweeps/<id>/``). Stop and save-best are the
API's endpoints, POSTed by the page. Any sweep or configuration that is not the user's is a 404.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from builder.configs.services import visible_configs
from builder.core.errors import Refusal
from builder.jobs.throttling import submission_wait
from builder.sweeps import services


@login_required
def sweep_list(request: HttpRequest) -> HttpResponse:
    sweeps = list(services.visible_sweeps(request.user).select_related("config_version__config")[:200])
    rows = [{"sweep": s, "done": s.trials.exclude(state__in=["pending", "running"]).count()} for s in sweeps]
    return render(request, "sweeps/list.html", {"rows": rows})


@login_required
def sweep_detail(request: HttpRequest, sweep_id: int) -> HttpResponse:
    sweep = services.get_visible_sweep(request.user, sweep_id)
    snapshot = services.snapshot(sweep)
    page = {"sweep": snapshot, "ws": f"/ws/sweeps/{sweep.pk}/", "api": f"/api/sweeps/{sweep.pk}"}
    return render(request, "sweeps/detail.html", {"sweep": sweep, "snap": snapshot, "page": page})


@login_required
@require_http_methods(["GET", "POST"])
def tune_learning_rate(request: HttpRequest, config_id: int) -> HttpResponse:
    """GET: what the sweep around the configuration's latest version will be; POST: start it, then its page."""
    config = visible_configs(request.user).filter(pk=config_id).first()
    if config is None:
        raise Http404("no such configuration")
    version = config.latest
    error = ""
    try:
        plan = services.tune_lr_plan(request.user, version)
    except Refusal as exc:
        return render(request, "sweeps/tune.html", {"config": config, "plan": None, "error": str(exc)}, status=409)
    if request.method == "POST":
        wait = submission_wait(request.user)
        if wait is not None:
            error = f"too many submissions: try again in {wait} s"
        else:
            try:
                sweep = services.start_sweep(request.user, plan.request())
            except Refusal as exc:
                error = str(exc)
            else:
                return redirect("sweeps:detail", sweep_id=sweep.pk)
    return render(
        request, "sweeps/tune.html", {"config": config, "plan": plan, "error": error}, status=400 if error else 200
    )
