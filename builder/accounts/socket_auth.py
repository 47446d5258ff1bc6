"""Websockets opened with an API token (scripts, notebooks, the command line) beside those of the browser's session.

A socket presents a token in one of two ways:

- the header ``Authorization: Token <key>`` (what ``moe_builder_client`` sends: any non-browser client can set it);
- the subprotocols ``["moe-builder", "token.<key>"]`` (a browser's ``WebSocket`` cannot set headers, only
  subprotocols); the handshake then answers with the subprotocol ``moe-builder``, so the key is not echoed back.

**A socket that presents a token is authenticated by that token alone.** Its session cookie is never read, and an
unknown key makes it anonymous (the consumers then refuse it, as they refuse anyone not signed in): it never falls
back to the cookie. That is what lets a token socket skip the Origin checks that browser sockets must pass
(``builder.core.origin``). Those checks stop cross-site websocket hijacking: a page on another site opening a socket
to us would have the visitor's browser attach the visitor's cookie, an *ambient* credential the page never sees.
A token is not ambient: the page must itself know the key and choose to send it, and whoever knows a key can already
do everything it allows over HTTP from anywhere. A hostile page that sends a bad token, or its author's own, gets
nothing of the visitor's (the cookie is not consulted), and non-browser clients send no Origin at all, so requiring
one would only shut them out. Access to each object is then checked by the consumer exactly as for a session
(``visible_job_or_close``: the owner and the users a job is shared with).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from channels.db import database_sync_to_async
from django.contrib.auth.models import AnonymousUser
from rest_framework.authtoken.models import Token

SUBPROTOCOL = "moe-builder"
TOKEN_SUBPROTOCOL_PREFIX = "token."


class Credential(NamedTuple):
    """The key a socket presented, and whether it came as a subprotocol (the handshake must then name one)."""

    key: str
    by_subprotocol: bool


def presented_token(scope: dict[str, Any]) -> Credential | None:
    """The token a websocket handshake presents, or None when it presents none (a browser's session socket).

    A malformed ``Authorization`` header (another scheme, no key) counts as a presented, unusable token: the socket
    is then anonymous rather than judged by its cookie."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            scheme, _, key = value.decode("latin-1").strip().partition(" ")
            return Credential(key.strip() if scheme.lower() == "token" else "", False)
    for protocol in scope.get("subprotocols") or []:
        if protocol.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return Credential(protocol[len(TOKEN_SUBPROTOCOL_PREFIX) :], True)
    return None


@database_sync_to_async
def token_user(key: str) -> Any:
    """The active user whose API token is ``key``; ``AnonymousUser`` for anything else (as DRF's token auth)."""
    token = Token.objects.select_related("user").filter(key=key).first() if key else None
    if token is None or not token.user.is_active:
        return AnonymousUser()
    return token.user


class TokenOrSessionSockets:
    """ASGI middleware for websocket scopes: a socket that presents a token goes to ``token_app`` with
    ``scope["user"]`` set from the token alone; any other socket (and any other scope) goes to ``session_app``, the
    browser's stack of Origin checks and cookie authentication. See the module docstring for why."""

    def __init__(self, token_app: Any, session_app: Any) -> None:
        self.token_app = token_app
        self.session_app = session_app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        credential = presented_token(scope) if scope["type"] == "websocket" else None
        if credential is None:
            return await self.session_app(scope, receive, send)
        user = await token_user(credential.key)
        scope = {**scope, "user": user}
        if not credential.by_subprotocol:
            return await self.token_app(scope, receive, send)
        offered = scope.get("subprotocols") or []
        chosen = SUBPROTOCOL if SUBPROTOCOL in offered else None

        async def send_naming_the_subprotocol(message: dict[str, Any]) -> None:
            # A browser fails a handshake whose answer names none of the subprotocols it offered; the consumers
            # accept without naming one, so the answer names ours here (never the token: it is not echoed back).
            if message["type"] == "websocket.accept" and not message.get("subprotocol") and chosen:
                message = {**message, "subprotocol": chosen}
            await send(message)

        return await self.token_app(scope, receive, send_naming_the_subprotocol)
