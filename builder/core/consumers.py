"""Websocket consumer of the status page: pushes the health report every few seconds.

Only a signed-in user may connect (the origin is checked by ``AllowedHostsOriginValidator`` in asgi.py).
Client messages are validated: ``{"type": "refresh"}`` asks for an immediate report; anything else gets an
``error`` message naming the field, and the connection stays open.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string

from builder.core.health import check_all, health_table_context
from builder.core.parsers import JSONInputError, parse_bounded

PUSH_INTERVAL_S = 5.0
# Close code for an anonymous connection (4000-4999 are for applications; 4401 mirrors HTTP 401).
CLOSE_UNAUTHENTICATED = 4401


class StatusConsumer(AsyncWebsocketConsumer):
    _pusher: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        await self.accept()
        await self.send_json({"type": "hello", "user": user.get_username()})
        self._pusher = asyncio.create_task(self._push_forever())

    async def disconnect(self, code: int) -> None:
        if self._pusher is not None:
            self._pusher.cancel()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            message = parse_bounded(text_data or "")
        except JSONInputError:  # not JSON, or over the JSON limits (a deeply nested frame)
            await self.send_json({"type": "error", "field": "", "message": "messages must be JSON objects"})
            return
        if not isinstance(message, dict):
            await self.send_json({"type": "error", "field": "", "message": "messages must be JSON objects"})
        elif message.get("type") != "refresh":
            await self.send_json(
                {"type": "error", "field": "type", "message": "unknown message type; expected 'refresh'"}
            )
        else:
            await self._send_health()

    async def _push_forever(self) -> None:
        while True:
            await self._send_health()
            await asyncio.sleep(PUSH_INTERVAL_S)

    async def _send_health(self) -> None:
        report = await database_sync_to_async(check_all)()
        # The same template as the page, so the live table and the server-rendered one never diverge.
        html = render_to_string("core/_health_table.html", health_table_context(report))
        await self.send_json({"type": "health", "report": report, "html": html})

    async def send_json(self, content: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(content))
