"""Refuse a request body before it is read: over its address's limit (413), or sent by nobody signed in (401).

An ASGI middleware in front of Django. The server (uvicorn) hands a body over in chunks and stops reading the socket
while the application does not ask for more, so a body the application never reads never reaches memory; Django
itself spools what it reads to a temporary file past ``FILE_UPLOAD_MAX_MEMORY_SIZE``. What is left to decide before
reading is whether to read at all:

- a declared ``Content-Length`` over the address's limit is answered 413 at once;
- a body without a length (``Transfer-Encoding: chunked``) is counted as it is read, and answered 413 the moment
  it passes the limit (the application sees the client leave);
- a body larger than ``ANONYMOUS_MAX_BODY_BYTES`` (or without a length) from a request with neither a session
  cookie nor an ``Authorization`` header, to an address that needs a signed-in user, is answered 401 at once.
  (A forged cookie still gets at most the address's limit read before Django refuses it.)

Every address has ``REQUEST_MAX_BODY_BYTES`` unless an app registered another (``allow``): the datasets app does for
upload chunks and single-file uploads. In production a proxy in front should enforce the same largest limit (see
README, "Production").
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

from django.conf import settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]  # Django's handler types its arguments a little differently

# Methods whose body is never wanted: anything sent with them is refused like an oversized body.
BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class RouteLimit:
    method: str
    path: re.Pattern[str]
    limit: Callable[[], int]  # read at request time: settings may change (tests, env)


_routes: list[RouteLimit] = []
# Addresses that take a body from someone not signed in yet (they sign in).
_open_to_anonymous: list[re.Pattern[str]] = [
    re.compile(r"^/accounts/(login|signup)/?$"),
    re.compile(r"^/api/auth/token/?$"),
    re.compile(r"^/admin/login/?$"),
]


def allow(method: str, path_pattern: str, limit: Callable[[], int]) -> None:
    """Let requests of ``method`` to paths matching ``path_pattern`` carry up to ``limit()`` bytes."""
    route = RouteLimit(method.upper(), re.compile(path_pattern), limit)
    if route not in _routes:
        _routes.append(route)


def limit_for(method: str, path: str) -> int:
    if method in BODYLESS:
        return 0
    for route in _routes:
        if route.method == method and route.path.match(path):
            return route.limit()
    return int(settings.REQUEST_MAX_BODY_BYTES)


def _has_credentials(headers: dict[bytes, bytes]) -> bool:
    if headers.get(b"authorization"):
        return True
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # a malformed cookie header carries no session
        return False
    return settings.SESSION_COOKIE_NAME in cookie


async def _answer(send: Send, status: int, field: str, message: str, **extra: str) -> None:
    """A JSON refusal in the API's shape for a body problem; the connection closes (the body is not drained)."""
    body = json.dumps({field: [message]} if field else {"detail": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.encode(), v.encode()) for k, v in extra.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestBodyLimits:
    """The middleware (see the module docstring). Wraps the HTTP application; other scopes pass through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        limit = limit_for(method, path)
        declared_header = headers.get(b"content-length")
        declared: int | None = None
        if declared_header is not None:
            try:
                declared = int(declared_header)
            except ValueError:
                return await _answer(send, 400, "", "Content-Length is not a number")
        unbounded = declared is None and b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        # Who asks comes first: someone not signed in learns nothing of an address's limit.
        large = unbounded or (declared or 0) > int(settings.ANONYMOUS_MAX_BODY_BYTES)
        if large and not _has_credentials(headers) and not any(p.match(path) for p in _open_to_anonymous):
            return await _answer(
                send, 401, "", "Authentication credentials were not provided.", **{"www-authenticate": "Token"}
            )
        if declared is not None and declared > limit:
            return await _answer(
                send, 413, "", f"the request body ({declared} bytes) is over this address's limit of {limit} bytes"
            )
        if not unbounded:
            return await self.app(scope, receive, send)
        await self._counted(scope, receive, send, limit)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Pass a body of unknown length through, counting it; past ``limit`` answer 413 and tell the application
        the client left (so it stops reading and answers nothing)."""
        seen = 0
        refused = False
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    if not started:
                        await _answer(send, 413, "", f"the request body is over this address's limit of {limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the refusal is the answer
            started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
