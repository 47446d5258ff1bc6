from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from builder.core import hardware_classes
from builder.fleet.registry import rows_for


@login_required
@never_cache
def worker_list(request: HttpRequest) -> HttpResponse:
    """The workers and the hardware classes; live over ``/ws/workers/`` (``builder.fleet.consumers``)."""
    default = hardware_classes.default_class()
    classes = [{**c.as_dict(), "default": c.name == default} for c in hardware_classes.classes().values()]
    return render(request, "fleet/workers.html", {"rows": rows_for(request.user), "classes": classes})
