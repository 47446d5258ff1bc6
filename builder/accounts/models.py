"""The audit log: who did what to which object, when, from where.

One row per event (``AuditEvent``), written by ``builder.accounts.audit`` (apps above this one call it). An event
has an ``actor`` (who acted; None when nobody was signed in, as for a failed sign-in) and an ``owner`` (whose account
or object it concerns). Both see it; nobody else does (``visible_events``). A failed sign-in to alice's account is
alice's event, with the address it came from; a download by bob of a job alice shared with him is bob's and alice's.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q, QuerySet


class AuditAction(models.TextChoices):
    SIGN_IN = "sign_in", "Signed in"
    SIGN_IN_FAILED = "sign_in_failed", "Sign-in failed"
    TOKEN_ISSUED = "token_issued", "API token issued"
    JOB_LAUNCHED = "job_launched", "Job launched"
    DOWNLOAD = "download", "Downloaded"
    DELETION = "deletion", "Deleted"


class AuditEvent(models.Model):
    created_at = models.DateTimeField(auto_now_add=True)
    action = models.CharField(max_length=32, choices=AuditAction.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="Who acted; empty when nobody was signed in (a failed sign-in).",
    )  # fmt: skip
    actor_name = models.CharField(max_length=150, blank=True, help_text="The username given or used.")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+",
        help_text="Whose account or object the event concerns.",
    )  # fmt: skip
    object_type = models.CharField(max_length=40, blank=True, help_text="job, dataset, config, report; or empty.")
    object_id = models.BigIntegerField(null=True, blank=True)
    object_name = models.CharField(max_length=200, blank=True)
    detail: models.JSONField[Any] = models.JSONField(default=dict, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True, help_text="The client's address.")

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="audit_owner_recent"),
            models.Index(fields=["actor", "-created_at"], name="audit_actor_recent"),
        ]

    def __str__(self) -> str:
        target = f" {self.object_type} {self.object_id}" if self.object_type else ""
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_name or '-'} {self.action}{target}"


def visible_events(user: Any) -> QuerySet[AuditEvent]:
    """The events ``user`` acted in or that concern them, newest first; none for an anonymous user."""
    if not user.is_authenticated:
        return AuditEvent.objects.none()
    return AuditEvent.objects.filter(Q(actor=user) | Q(owner=user))
