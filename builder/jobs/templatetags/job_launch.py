"""``{% load job_launch %}``: the one-click launch form other apps' pages embed (the comparison)."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.inclusion_tag("jobs/_launch_form.html", takes_context=True)
def job_launch_form(context: dict[str, Any], version_id: int) -> dict[str, Any]:
    """A one-click launch of saved configuration version ``version_id`` for other apps' pages (the comparison):
    a dataset menu (the signed-in user's ready datasets and the built-in ones, the demo corpus first) and a
    Launch button POSTing to ``jobs:launch``, which redirects to the new job's dashboard."""
    from builder.jobs.submit import default_dataset, visible_ready_datasets

    user = context["request"].user
    return {
        "version_id": version_id,
        "datasets": list(visible_ready_datasets(user).order_by("owner", "name")),
        "default_dataset": default_dataset(user),
        "csrf_token": context.get("csrf_token"),
    }
