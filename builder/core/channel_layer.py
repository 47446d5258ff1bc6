"""The Channels layer over Redis, made to outlive a Redis outage.

channels-redis raises from ``receive`` when Redis is unreachable, and Channels' consumer loop lets that error end
the consumer: every open websocket closed with 1011 and every reconnect failed while Redis was down. Here a failed
receive waits and tries again, so a socket stays open (its consumer serves the record from the database meanwhile,
see ``builder.jobs.consumers``) and picks the live stream up again once Redis is back. Sends and group changes still
raise: their callers decide (``publish`` is best effort; a consumer that cannot join its group says live updates
are paused).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels_redis.core import RedisChannelLayer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

# What "Redis is unreachable" looks like from redis-py (and the socket under it).
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
RETRY_SECONDS = 1.0


class ResilientRedisChannelLayer(RedisChannelLayer):
    async def receive(self, channel: str) -> Any:
        while True:
            try:
                return await super().receive(channel)
            except UNREACHABLE as exc:
                log.warning("channel layer: Redis unreachable (%s); retrying in %.0f s", exc, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
