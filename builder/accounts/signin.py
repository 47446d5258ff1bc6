"""Sign-in attempts: the rate limit on failures and the audit of every attempt, for the form and the API alike.

Both doors authenticate through ``django.contrib.auth.authenticate``, which sends ``user_login_failed`` on a failure;
``login()`` sends ``user_logged_in``. The receivers here record both in the audit log, and count each failure in the
``signin`` rate limit of (client address, username). Before authenticating, a door asks ``wait_before_signin``: a
pair that used up its failures for the window is answered 429 with ``Retry-After``, whatever the password, so the
window bounds how many passwords one address can try on one account. Keyed on both, so that charlie's attempts never
lock alice out (nor alice's charlie), and successes never count (people sign in often; guesses fail).
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.dispatch import receiver

from builder.accounts import audit
from builder.accounts.models import AuditAction
from builder.core.ratelimit import RateLimit, client_ip

SIGN_IN = RateLimit("signin")


def _identity(request: Any, username: str) -> str:
    # Hashed: a username may hold characters a cache key must not (spaces, control characters, any length).
    name = hashlib.sha256(username.strip().casefold().encode("utf-8", "replace")).hexdigest()[:32]
    return f"{client_ip(request) if request is not None else ''}:{name}"


def wait_before_signin(request: Any, username: str) -> int | None:
    """Seconds before ``username`` may be tried again from this client (it failed too often), else None."""
    return SIGN_IN.wait(_identity(request, username))


TOO_MANY = "Too many failed sign-ins to this account from your address."


def refusal_message(wait: int) -> str:
    return f"{TOO_MANY} Try again in {wait} seconds."


@receiver(user_login_failed, dispatch_uid="accounts.signin_failed")
def _signin_failed(sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any) -> None:
    username = str(credentials.get("username") or "")[:150]
    SIGN_IN.hit(_identity(request, username))
    # The account it was tried on (if it exists) sees the attempt, with the address it came from.
    owner = get_user_model().objects.filter(username=username).first() if username else None
    audit.record(request, AuditAction.SIGN_IN_FAILED, owner=owner, actor_name=username)


@receiver(user_logged_in, dispatch_uid="accounts.signed_in")
def _signed_in(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    audit.record(request, AuditAction.SIGN_IN, actor=user)
