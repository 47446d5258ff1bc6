"""``/ws/jobs/<id>/``: the live view of a job.

On connect (signed-in owner, or a user the job is shared with; the origin is checked in asgi.py) the consumer joins
the job's group first, then sends the stored history up to sequence number H (with every stored event and the
job's summary), then relays live messages, dropping any point with seq ≤ H and any event already sent. Channels
handles one message at a time per consumer, so no live batch is handled while the history is being read: nothing
is lost between the two and nothing is sent twice.

Server messages: ``history`` (``seq``, ``series``, ``events``, ``job``), ``metrics`` (``seq_from``, ``seq_to``,
``points``: ``[seq, step, name, value]``), ``event``, ``state``, ``truncate`` (``after_step``: drop later points),
``resync`` (the answer below), ``live`` (``paused``, ``reason``), ``error``. Every live message carries
``sent_at`` (Unix seconds at publication).

When the channel layer (Redis) is unreachable the socket still opens: the consumer sends the history from the
database, says ``{"type": "live", "paused": true}``, and sends what the database records every
``PAUSED_POLL_SECONDS`` (``metrics`` built from stored points, ``event``, ``state``) until it can join the group
again; then ``{"type": "live", "paused": false}``, and the live stream continues (a gap, if any, is resynced by
sequence number as usual).

Client messages: ``{"type": "resync", "after": <seq>}`` returns the exact points after ``seq`` (used when the
client sees a gap). Anything else gets an ``error`` naming the field.
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
from builder.core.parsers import JSONInputError, parse_bounded
from builder.jobs import history, lifecycle
from builder.jobs.access import visible_jobs
from builder.jobs.models import Job, JobEvent
from builder.jobs.serializers import job_summary

log = logging.getLogger(__name__)
CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
RESYNC_LIMIT = 20000
PAUSED_POLL_SECONDS = 2.0
PAUSED_REASON = "live updates are paused (the message broker is unreachable): showing what the database records"


def json_object(text: str | None) -> dict[str, Any] | None:
    """A websocket text frame as a JSON object, or None when it is not one (bad JSON, a list, a number, or over the
    JSON limits: a deeply nested frame would otherwise crash the consumer with RecursionError)."""
    try:
        message = parse_bounded(text or "")
    except JSONInputError:
        return None
    return message if isinstance(message, dict) else None


def resync_after(message: dict[str, Any] | None) -> int:
    """The ``after`` of a client's ``{"type": "resync", "after": <seq>}``; anything else is a ``Refusal`` naming
    the field at fault."""
    if message is None:
        raise Refusal("", "messages must be JSON objects")
    if message.get("type") != "resync":
        raise Refusal("type", "unknown message type; expected 'resync'")
    after = message.get("after")
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise Refusal("after", "after must be a non-negative integer sequence number")
    return after


async def visible_job_or_close(consumer: AsyncWebsocketConsumer) -> Job | None:
    """The job of the socket's ``job_id`` URL kwarg if the signed-in user may see it; otherwise close the socket
    (4401 anonymous, 4404 not found or not theirs: the outsider cannot tell the two apart) and return None.

    The Origin was already checked by ``AllowedHostsOriginValidator`` in ``builder/asgi.py``."""
    user = consumer.scope.get("user")
    if user is None or not user.is_authenticated:
        await consumer.close(code=CLOSE_UNAUTHENTICATED)
        return None
    job_id = int(consumer.scope["url_route"]["kwargs"]["job_id"])
    job: Job | None = await database_sync_to_async(lambda: visible_jobs(user).filter(pk=job_id).first())()
    if job is None:
        await consumer.close(code=CLOSE_NOT_FOUND)
    return job


class JobConsumer(AsyncWebsocketConsumer):
    job_id: int
    seen_seq: int = 0
    seen_event_seq: int = 0
    seen_state: str = ""
    rejoin: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        job = await visible_job_or_close(self)
        if job is None:
            return
        self.job_id = job.pk
        joined = await self._join()
        await self.accept()
        snapshot = await database_sync_to_async(self._snapshot)(job)
        self.seen_seq = snapshot["seq"]
        self.seen_event_seq = snapshot["events"][-1]["seq"] if snapshot["events"] else 0
        self.seen_state = snapshot["job"]["state"]
        await self._send({"type": "history", **snapshot})
        if not joined:
            await self._send({"type": "live", "paused": True, "reason": PAUSED_REASON})
            self.rejoin = asyncio.create_task(self._serve_from_the_record())

    async def _join(self) -> bool:
        """Join the job's group; False when the channel layer is unreachable."""
        assert self.channel_layer is not None
        try:
            await self.channel_layer.group_add(lifecycle.group_name(self.job_id), self.channel_name)
        except UNREACHABLE:
            log.warning("job %s socket: the channel layer is unreachable; serving the record", self.job_id)
            return False
        return True

    async def _serve_from_the_record(self) -> None:
        """While the group cannot be joined, send what the database records, then rejoin the live stream."""
        while True:
            await asyncio.sleep(PAUSED_POLL_SECONDS)
            for message in await database_sync_to_async(self._recorded_since)():
                await self._send(message)
            if await self._join():
                await self._send({"type": "live", "paused": False, "reason": ""})
                return

    def _recorded_since(self) -> list[dict[str, Any]]:
        """Points, events and the state stored since what this socket has sent, as the live stream sends them."""
        job = Job.objects.get(pk=self.job_id)
        messages: list[dict[str, Any]] = []
        points = history.points_after(job, self.seen_seq, RESYNC_LIMIT)
        if points:
            messages.append({"type": "metrics", "seq_from": points[0][0], "seq_to": points[-1][0], "points": points})
            self.seen_seq = points[-1][0]
        for event in JobEvent.objects.filter(job=job, seq__gt=self.seen_event_seq).order_by("seq"):
            messages.append({"type": "event", "event": lifecycle.event_payload(event)})
            self.seen_event_seq = event.seq
        if job.state != self.seen_state:
            messages.append({"type": "state", "state": job.state, "reason": ""})
            self.seen_state = job.state
        return messages

    def _snapshot(self, job: Job) -> dict[str, Any]:
        data = history.history(job)
        events = [lifecycle.event_payload(e) for e in JobEvent.objects.filter(job=job).order_by("seq")]
        job.refresh_from_db()  # after the points: the summary is at least as new as the history
        return {**data, "events": events, "job": job_summary(job)}

    async def disconnect(self, code: int) -> None:
        if self.rejoin is not None:
            self.rejoin.cancel()
        if hasattr(self, "job_id") and self.channel_layer is not None:
            with contextlib.suppress(*UNREACHABLE):  # a group entry left behind expires with the layer's expiry
                await self.channel_layer.group_discard(lifecycle.group_name(self.job_id), self.channel_name)

    async def job_message(self, event: dict[str, Any]) -> None:
        message = event["message"]
        if message["type"] == "metrics":
            if message["seq_to"] <= self.seen_seq:
                return  # already part of the history this client got
            if message["seq_from"] <= self.seen_seq:
                points = [p for p in message["points"] if p[0] > self.seen_seq]
                message = {**message, "seq_from": points[0][0], "points": points}
            self.seen_seq = message["seq_to"]
        elif message["type"] == "event":
            # An event stored between joining the group and reading the history is in both: send it once.
            if message["event"]["seq"] <= self.seen_event_seq:
                return
            self.seen_event_seq = message["event"]["seq"]
        elif message["type"] == "state":
            self.seen_state = message["state"]
        await self._send(message)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            after = resync_after(json_object(text_data))
        except Refusal as exc:
            await self._send(error_frame(exc))
            return
        job = await database_sync_to_async(Job.objects.get)(pk=self.job_id)
        points = await database_sync_to_async(history.points_after)(job, after, RESYNC_LIMIT)
        await self._send({"type": "resync", "after": after, "points": points})

    async def _send(self, content: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(content))
