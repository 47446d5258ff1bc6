"""``/ws/workers/``: the live workers page.

A signed-in user only (4401 otherwise; the origin is checked in asgi.py). On connect the consumer joins the group
``workers`` and sends the registry as this user may see it; every ``workers.changed`` (a worker advertised, beat or
stopped) sends it again, at most once per ``MIN_INTERVAL_S``, and so does a timer every ``REFRESH_S`` (the group is
best effort; a worker that died sends nothing, and the page must show its heartbeat ageing).

Server messages: ``{"type": "workers", "workers": [...], "html": "<table>..."}`` (rows as ``GET /api/workers``; the
HTML is the page's own table template), ``error``. Client messages: ``{"type": "refresh"}``; anything else gets an
``error`` naming the field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string

from builder.core.parsers import JSONInputError, parse_bounded
from builder.fleet.registry import GROUP, rows_for

log = logging.getLogger(__name__)
CLOSE_UNAUTHENTICATED = 4401
MIN_INTERVAL_S = 1.0
REFRESH_S = 10.0


class WorkersConsumer(AsyncWebsocketConsumer):
    _timer: asyncio.Task[None] | None = None
    _pending: asyncio.Task[None] | None = None
    _joined = False
    _last_sent = 0.0

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        await self.accept()
        try:
            await self.channel_layer.group_add(GROUP, self.channel_name)
            self._joined = True
        except Exception:  # Redis down: the timer still refreshes the page from the database
            log.warning("workers page: could not join the live group", exc_info=True)
        await self._send_workers()
        self._timer = asyncio.create_task(self._refresh_forever())

    async def disconnect(self, code: int) -> None:
        for task in (self._timer, self._pending):
            if task is not None:
                task.cancel()
        if self._joined:
            try:
                await self.channel_layer.group_discard(GROUP, self.channel_name)
            except Exception:
                log.debug("workers page: could not leave the group", exc_info=True)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            message = parse_bounded(text_data or "")
        except JSONInputError:
            message = None
        if not isinstance(message, dict):
            await self.send_json({"type": "error", "field": "", "message": "messages must be JSON objects"})
        elif message.get("type") != "refresh":
            await self.send_json(
                {"type": "error", "field": "type", "message": "unknown message type; expected 'refresh'"}
            )
        else:
            await self._send_workers()

    async def workers_changed(self, event: dict[str, Any]) -> None:
        # Many workers beat every few seconds: one send per MIN_INTERVAL_S carries all their changes.
        if self._pending is None or self._pending.done():
            self._pending = asyncio.create_task(self._send_soon())

    async def _send_soon(self) -> None:
        await asyncio.sleep(max(0.0, self._last_sent + MIN_INTERVAL_S - time.monotonic()))
        await self._send_workers()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self._send_workers()

    async def _send_workers(self) -> None:
        self._last_sent = time.monotonic()
        rows = await database_sync_to_async(rows_for)(self.scope["user"])
        html = render_to_string("fleet/_workers_table.html", {"rows": rows})
        await self.send_json({"type": "workers", "workers": rows, "html": html})

    async def send_json(self, content: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(content))
