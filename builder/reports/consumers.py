"""``/ws/playground/<job_id>/[?report=<id>]``: prompt in, generated text streamed back.

Who may connect: a signed-in user who may see the job (its owner or a user it is shared with); anyone else is
refused before the handshake completes (the origin is checked in asgi.py). On connect the consumer loads the
checkpoint once, off the event loop, and says ``ready`` (or ``error`` with field ``report`` when it cannot).

Client messages (JSON objects):

- causal_lm: ``{"prompt", "temperature": 0.8, "top_k": null, "top_p": null, "max_tokens": 64, "seed": null}``
  → ``start``, then ``token`` messages (``text``: the next decoded piece) as the model produces them, then
  ``done`` (``tokens``: the pieces sent, ``seconds``, ``stopped``: ``"eos"`` when the model ended the text,
  ``"max_tokens"`` when it reached ``max_tokens``, ``"stop"`` when the client stopped it). A model may end the
  text at once: ``done`` with ``tokens`` 0 and ``stopped`` ``"eos"``. The same ``seed`` and fields give the
  same text;
- classification: ``{"text"}`` (or ``prompt``) → ``labels`` (``probabilities``: ``[{label, p}]``, most
  probable first), then ``done``;
- ``{"type": "stop"}`` ends a running generation after its current token.

A request while another runs, or one that fails validation, gets ``{"type": "error", "field", "message"}``;
the connection stays open. Generation runs on a small thread pool shared by every connection of this process,
so the event loop keeps serving pages and sockets while the model works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from builder.core.errors import Refusal, error_frame
from builder.core.redaction import describe_failure
from builder.jobs.consumers import json_object, visible_job_or_close
from builder.reports import playground

log = logging.getLogger(__name__)

# Two at a time per web process: a third request waits its turn instead of taking every core from the server.
INFERENCE = ThreadPoolExecutor(max_workers=2, thread_name_prefix="playground")
_END = object()


class PlaygroundConsumer(AsyncWebsocketConsumer):
    # An alias with no configured layer (channels then gives None): the playground talks to its own client
    # only, so it joins no group and costs no Redis round trip.
    channel_layer_alias = "playground-needs-no-layer"
    job_id: int
    task: str = ""
    _model: asyncio.Future[Any] | None = None
    _running: asyncio.Task[None] | None = None
    _stop: threading.Event
    _closed: bool = False

    async def connect(self) -> None:
        job = await visible_job_or_close(self)
        if job is None:
            return
        self.job_id = job.pk
        self._stop = threading.Event()
        await self.accept()
        try:
            source = await database_sync_to_async(playground.find_source)(job, self._report_param())
        except Refusal as exc:
            await self._send(error_frame(exc))
            return
        await self._send({"type": "loading", "checkpoint_step": source.step, "report": source.report_id})
        loop = asyncio.get_running_loop()
        # Loaded once per connection, on the pool: reading and verifying a checkpoint takes a while.
        self._model = loop.run_in_executor(INFERENCE, playground.load, source)
        try:
            inference = await self._model
        except Refusal as exc:
            await self._send(error_frame(exc))
            return
        except Exception as exc:  # a checkpoint that does not verify, a missing tokenizer: say so, stay open
            log.warning("playground of job %s could not load step %s", self.job_id, source.step, exc_info=True)
            failure = Refusal("report", f"the checkpoint could not be loaded: {describe_failure(exc)}")
            await self._send(error_frame(failure))
            return
        self.task = inference.spec.model.task
        await self._send(
            {
                "type": "ready",
                "task": self.task,
                "checkpoint_step": source.step,
                "report": source.report_id,
                "labels": [str(label) for label in inference.labels] if inference.labels else None,
                "limits": {
                    "max_tokens": settings.PLAYGROUND_MAX_NEW_TOKENS,
                    "prompt_chars": settings.PLAYGROUND_MAX_PROMPT_CHARS,
                    "temperature": playground.MAX_TEMPERATURE,
                    "top_k": inference.spec.model.vocab_size,
                },
            }
        )

    def _report_param(self) -> int | None:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        raw = (query.get("report") or [None])[0]
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise Refusal("report", "report must be an integer id") from None

    async def disconnect(self, code: int) -> None:
        self._closed = True
        if hasattr(self, "_stop"):
            self._stop.set()  # the generating thread ends after its current token

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            message = json_object(text_data)
            if message is None:
                raise Refusal("", "messages must be JSON objects")
            kind = message.get("type", "generate" if self.task != "classification" else "classify")
            if kind == "stop":
                self._stop.set()
                return
            if kind not in ("generate", "classify"):
                raise Refusal("type", "type must be generate, classify or stop")
            if self._model is None or not self._model.done() or self._model.exception() is not None:
                raise Refusal("", "the model is not loaded (wait for the ready message)")
            if self._running is not None and not self._running.done():
                raise Refusal("", 'a request is already running: wait for done, or send {"type": "stop"}')
            inference = self._model.result()
            if self.task == "classification":
                request: Any = playground.parse_classify(message)
            else:
                if kind == "classify":
                    raise Refusal("type", "this model generates text: send a prompt")
                request = playground.parse_generate(message, inference.spec.model.vocab_size)
        except Refusal as exc:
            await self._send(error_frame(exc))
            return
        self._stop.clear()
        # A task of its own: this handler returns at once, so a stop message can be received meanwhile.
        self._running = asyncio.create_task(self._serve(inference, request))

    async def _serve(self, inference: Any, request: Any) -> None:
        began = time.perf_counter()
        try:
            if isinstance(request, playground.ClassifyRequest):
                await self._classify(inference, request, began)
            else:
                await self._generate(inference, request, began)
        except Exception as exc:  # never a crashed socket: the client hears what went wrong
            log.warning("playground request on job %s failed", self.job_id, exc_info=True)
            await self._send(error_frame(Refusal("", describe_failure(exc))))

    async def _classify(self, inference: Any, request: playground.ClassifyRequest, began: float) -> None:
        from workers.engine.evaluate import classify

        await self._send({"type": "start"})
        loop = asyncio.get_running_loop()
        ranked = await loop.run_in_executor(INFERENCE, classify, inference, request.text)
        probabilities = [{"label": str(label), "p": p} for label, p in ranked]
        await self._send({"type": "labels", "probabilities": probabilities})
        await self._send({"type": "done", "tokens": 0, "seconds": round(time.perf_counter() - began, 3)})

    async def _generate(self, inference: Any, request: playground.GenerateRequest, began: float) -> None:
        from workers.engine.evaluate import stream_generate

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[Any] = asyncio.Queue()
        stop = self._stop

        def produce() -> str:
            """On a pool thread: hand each piece to the event loop as soon as it is decoded."""
            stream = stream_generate(
                inference,
                request.prompt,
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_k=request.top_k,
                top_p=request.top_p,
                seed=request.seed,
            )
            try:
                for piece in stream:
                    loop.call_soon_threadsafe(pieces.put_nowait, piece)
                    if stop.is_set():
                        return "stop"
                return stream.ended or "max_tokens"
            finally:
                stream.close()  # ends generation after its current token and restores the model's mode
                loop.call_soon_threadsafe(pieces.put_nowait, _END)

        await self._send({"type": "start"})
        work = loop.run_in_executor(INFERENCE, produce)
        count = 0
        while (piece := await pieces.get()) is not _END:
            count += 1
            await self._send({"type": "token", "text": piece})
        stopped = await work  # raises what the thread raised
        await self._send(
            {"type": "done", "tokens": count, "seconds": round(time.perf_counter() - began, 3), "stopped": stopped}
        )

    async def _send(self, content: dict[str, Any]) -> None:
        if not self._closed:  # a request still finishing after its client left has no one to tell
            await self.send(text_data=json.dumps(content))
