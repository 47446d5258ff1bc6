"""``/ws/sweeps/<id>/``: the live view of a sweep.

On connect (the signed-in owner; anyone else is closed with 4404, an anonymous socket with 4401; the origin is
checked in asgi.py) the consumer joins the sweep's group, then sends a ``snapshot`` (``builder.sweeps.services
.snapshot``). Every tick publishes ``sweep.changed`` to the group; the consumer answers with a fresh snapshot read
from the database (the record), so a page that missed a message is whole again at the next one. While trials train,
a snapshot also follows each running trial's step every ``REFRESH_SECONDS``.

Server messages: ``snapshot`` (``sweep``), ``error``. Client messages: none (anything sent gets an ``error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from builder.core.channel_layer import UNREACHABLE
from builder.core.errors import Refusal, error_frame
from builder.sweeps import services
from builder.sweeps.models import Sweep
from builder.sweeps.work import group_name

log = logging.getLogger(__name__)
CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
REFRESH_SECONDS = 3.0


class SweepConsumer(AsyncWebsocketConsumer):
    sweep_id: int
    refresher: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        sweep_id = int(self.scope["url_route"]["kwargs"]["sweep_id"])
        sweep = await database_sync_to_async(lambda: services.visible_sweeps(user).filter(pk=sweep_id).first())()
        if sweep is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.sweep_id = sweep.pk
        assert self.channel_layer is not None
        try:
            await self.channel_layer.group_add(group_name(self.sweep_id), self.channel_name)
        except UNREACHABLE:
            log.warning("sweep %s socket: the channel layer is unreachable; refreshing from the record", sweep_id)
        await self.accept()
        await self.send_snapshot()
        self.refresher = asyncio.create_task(self._refresh())

    async def disconnect(self, code: int) -> None:
        if self.refresher is not None:
            self.refresher.cancel()
        if hasattr(self, "sweep_id") and self.channel_layer is not None:
            with contextlib.suppress(*UNREACHABLE):
                await self.channel_layer.group_discard(group_name(self.sweep_id), self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self._send(error_frame(Refusal("type", "this socket takes no messages")))

    async def sweep_changed(self, event: dict[str, Any]) -> None:
        await self.send_snapshot()

    async def send_snapshot(self) -> None:
        snapshot = await database_sync_to_async(self._snapshot)()
        await self._send({"type": "snapshot", "sweep": snapshot})

    def _snapshot(self) -> dict[str, Any]:
        return services.snapshot(Sweep.objects.get(pk=self.sweep_id))

    async def _refresh(self) -> None:
        """The running trials' steps move between ticks: a snapshot every few seconds while the sweep runs."""
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            running = await database_sync_to_async(lambda: not Sweep.objects.get(pk=self.sweep_id).is_final)()
            if not running:
                await self.send_snapshot()
                return
            await self.send_snapshot()

    async def _send(self, content: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(content))
