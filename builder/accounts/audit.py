"""Recording audit events (``builder.accounts.models.AuditEvent``): the one function every app calls.

``record(request, action, target)`` after the action succeeded: the actor is the request's signed-in user, the
owner the target's (``owner_id``, or the one given), the address the client's as the rate limits see it
(``builder.core.ratelimit.client_ip``). Deletions describe their target before deleting it (``Target.of``), since a
deleted row has no id. The apps above this one (datasets, configs, jobs, reports) call it; this module imports none
of them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from builder.accounts.models import AuditAction, AuditEvent
from builder.core.ratelimit import client_ip


@dataclass(frozen=True)
class Target:
    """What an event is about: a model's name (``job``), its id, its name and its owner's id."""

    type: str
    id: int | None
    name: str = ""
    owner_id: int | None = None

    @classmethod
    def of(cls, obj: Any, owner_id: int | None = None) -> Target:
        """``obj``'s description; ``owner_id`` for objects without an ``owner_id`` of their own (a report)."""
        name = str(getattr(obj, "name", "") or "")[:200]
        return cls(
            obj._meta.model_name, obj.pk, name, owner_id if owner_id is not None else getattr(obj, "owner_id", None)
        )


def _address(request: Any) -> str | None:
    raw = client_ip(request) if request is not None else ""
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:  # no address (a test client, a unix socket) or a malformed forwarded header
        return None


def record(
    request: Any,
    action: AuditAction,
    target: Target | Any | None = None,
    *,
    owner: Any = None,
    actor: Any = None,
    actor_name: str = "",
    **detail: Any,
) -> AuditEvent:
    """Store one event (see the module docstring); ``target`` is a ``Target`` or a model instance.

    ``actor`` defaults to the request's signed-in user (None for an anonymous request), ``owner`` to the target's
    owner, else the actor. ``detail`` is stored as JSON (what was downloaded, the reason of a failure...).
    """
    if target is not None and not isinstance(target, Target):
        target = Target.of(target)
    if actor is None and request is not None:
        user = getattr(request, "user", None)
        actor = user if user is not None and user.is_authenticated else None
    owner_id = getattr(owner, "pk", owner)
    if owner_id is None:
        owner_id = target.owner_id if target is not None and target.owner_id is not None else getattr(actor, "pk", None)
    return AuditEvent.objects.create(
        action=action,
        actor=actor,
        actor_name=(actor_name or (actor.get_username() if actor is not None else ""))[:150],
        owner_id=owner_id,
        object_type=target.type if target is not None else "",
        object_id=target.id if target is not None else None,
        object_name=target.name if target is not None else "",
        detail=detail,
        ip=_address(request),
    )
