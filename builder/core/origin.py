"""Websockets are opened only from the platform's own pages: the Origin must be the address the request came to.

Channels' ``AllowedHostsOriginValidator`` compares the Origin's host with ``ALLOWED_HOSTS`` and ignores its port, so
a page served by anything else on an allowed host (another port of 127.0.0.1, say) could open a socket with the
visitor's session cookie. Here the Origin's host *and port* must equal the request's ``Host`` header (what the
browser addressed: a proxy in front passes it on), or the Origin must be one of ``CSRF_TRUSTED_ORIGINS``, as for a
form post. A refused handshake is closed before it is accepted (HTTP 403).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _netloc(scheme: str, host: str, port: int | None) -> str:
    return f"{host.lower()}:{port or DEFAULT_PORTS.get(scheme, 80)}"


def same_origin(origin: str, host_header: str, trusted: list[str]) -> bool:
    """Whether a socket opened from ``origin`` to the address ``host_header`` may be accepted."""
    if origin in trusted:
        return True
    try:
        parsed = urlsplit(origin)
        addressed = urlsplit(f"{parsed.scheme}://{host_header}")
        if not parsed.hostname or not addressed.hostname:
            return False
        return _netloc(parsed.scheme, parsed.hostname, parsed.port) == _netloc(
            parsed.scheme, addressed.hostname, addressed.port
        )
    except ValueError:  # a malformed origin or port
        return False


class SameOriginValidator:
    """ASGI middleware for websocket scopes (see the module docstring); other scopes pass through."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket":
            headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            origin, host = headers.get(b"origin", ""), headers.get(b"host", "")
            if not same_origin(origin, host, list(settings.CSRF_TRUSTED_ORIGINS)):
                return await WebsocketDenier()(scope, receive, send)
        return await self.app(scope, receive, send)
