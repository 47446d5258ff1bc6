"""Websockets with an API token: a job's live metrics, and the playground.

**Live metrics** (``/ws/jobs/<id>/``, the server's ``builder/jobs/consumers.py``): the server sends ``history`` (up
to sequence number H, long series downsampled), then live ``metrics`` batches numbered ``seq_from..seq_to`` with
every point after H, and answers ``{"type": "resync", "after": S}`` with the *exact* stored points after S.
``JobWatch`` yields exact points only, each once, in sequence order, by keeping the last sequence number it yielded
(``last_seq``) and:

- on every (re)connection: ignores the downsampled history, asks for ``resync`` after ``last_seq``, and holds the
  live batches that arrive meanwhile; the answer (the database's record) then the held batches are yielded, each
  point only if its number is above ``last_seq``. Nothing is lost (the stored record covers the time the socket
  was down) and nothing repeats (numbers at or below ``last_seq`` are dropped);
- when a live batch does not start right after ``last_seq`` (the server's channel dropped one), the same resync;
- when the job reaches a final state, one last resync, then the iteration ends.

A dropped connection (a server restart, a proxy's timeout, a network failure) is retried with backoff for up to
``reconnect_for`` seconds before ``NetworkError``. A point the server stores again (a job resumed from an earlier
checkpoint re-records the steps after it) comes again with a new, higher sequence number: that is a new value.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from moe_builder_client.errors import ClientError, FieldError, NetworkError, PermissionDenied
from moe_builder_client.operations import JOB_SOCKET, PLAYGROUND_SOCKET

if TYPE_CHECKING:
    from moe_builder_client.client import Client

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
# The consumer answers a resync with at most this many points (RESYNC_LIMIT there): a full answer asks again.
RESYNC_LIMIT = 20000


class Point(NamedTuple):
    """One stored metric value. A list of them is a table: ``pandas.DataFrame(points)``."""

    seq: int
    step: int
    name: str
    value: float


def socket_url(base_url: str, path: str) -> str:
    """``http(s)://host[:port][/prefix]`` + ``path`` as a ``ws(s)://`` URL."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


def open_socket(client: Client, path: str, query: str = "") -> ClientConnection:
    """A websocket to ``path`` authenticated by the client's token (the ``Authorization`` header: a token socket
    needs no Origin). A refused handshake (anonymous, or an object that is not yours) is ``PermissionDenied``."""
    url = socket_url(client.base_url, path) + (f"?{query}" if query else "")
    try:
        return connect(url, additional_headers=client.auth_headers, open_timeout=client.timeout, close_timeout=2)
    except InvalidStatus as exc:
        status = exc.response.status_code
        refused = FieldError("", f"the server refused the websocket {path} (HTTP {status})")
        raise PermissionDenied(status, [refused]) from exc
    except InvalidURI as exc:
        raise ClientError(f"not a websocket address: {url}") from exc


class JobWatch:
    """Iterate over a job's metric points as they are recorded (see the module docstring).

    ``job`` is the job's latest summary (from the socket's history, then updated by ``state`` messages), ``state``
    its state, ``events`` every event received (interventions, anomalies, checkpoints), ``last_seq`` the number of
    the last point yielded (pass it as ``after`` to continue elsewhere), ``reconnects`` how many times the
    connection was opened again.
    """

    def __init__(
        self,
        client: Client,
        job_id: int,
        after: int = 0,
        reconnect_for: float = 60.0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.client, self.job_id, self.last_seq = client, job_id, after
        self.reconnect_for = reconnect_for
        self.on_event = on_event
        self.job: dict[str, Any] = {}
        self.state = ""
        self.events: list[dict[str, Any]] = []
        self.reconnects = 0

    def __iter__(self) -> Iterator[Point]:
        down_since: float | None = None
        delay = 0.2
        while True:
            try:
                ws = open_socket(self.client, JOB_SOCKET.format(job_id=self.job_id))
            except PermissionDenied:
                self.client.jobs.get(self.job_id)  # a job that is gone or not yours: NotFound names it
                raise
            except (OSError, TimeoutError) as exc:
                down_since = self._wait_before_retry(down_since, delay, exc)
                delay = min(delay * 2, 2.0)
                continue
            try:
                with ws:
                    down_since, delay = None, 0.2
                    yield from self._follow(ws)
                    return
            except (ConnectionClosed, OSError, TimeoutError) as exc:
                # The server went away mid-stream (restart, crash, proxy timeout): reconnect and resync.
                self.reconnects += 1
                down_since = self._wait_before_retry(down_since, delay, exc)

    def _wait_before_retry(self, down_since: float | None, delay: float, exc: BaseException) -> float:
        now = time.monotonic()
        down_since = now if down_since is None else down_since
        if now - down_since > self.reconnect_for:
            raise NetworkError(
                f"the job {self.job_id} socket stayed down for {self.reconnect_for:.0f}s: {exc}"
            ) from exc
        time.sleep(delay)
        return down_since

    def _take(self, points: list[list[Any]]) -> Iterator[Point]:
        for seq, step, name, value in points:
            if seq > self.last_seq:
                self.last_seq = seq
                yield Point(seq, step, name, value)

    def _follow(self, ws: ClientConnection) -> Iterator[Point]:
        """One connection: resync from ``last_seq``, then follow live batches until the job is final."""
        held: list[dict[str, Any]] = []
        awaiting = False
        ending = False

        def resync() -> None:
            nonlocal awaiting
            ws.send(json.dumps({"type": "resync", "after": self.last_seq}))
            awaiting = True

        for raw in ws:
            message = json.loads(raw)
            kind = message.get("type")
            if kind == "history":
                self.job = message.get("job") or {}
                self.state = str(self.job.get("state", ""))
                self._events(message.get("events") or [])
                ending = self.state in TERMINAL_STATES
                resync()  # the history is downsampled: ask for the exact points after what we have
            elif kind == "metrics":
                if awaiting:
                    held.append(message)
                elif message["seq_from"] > self.last_seq + 1:
                    held.append(message)
                    resync()  # a gap: a batch the server's channel dropped
                else:
                    yield from self._take(message["points"])
            elif kind == "resync":
                points = message.get("points") or []
                yield from self._take(points)
                if len(points) >= RESYNC_LIMIT:
                    resync()  # more remain
                    continue
                awaiting = False
                # The record covered everything up to its reading; what was held is kept only above it.
                for batch in held:
                    yield from self._take(batch["points"])
                held.clear()
                if ending:
                    return
            elif kind == "state":
                self.state = str(message.get("state", ""))
                self.job = {**self.job, "state": self.state}
                if self.state in TERMINAL_STATES and not ending:
                    ending = True
                    if not awaiting:
                        resync()  # the last points were stored before the state changed: make sure of them
            elif kind == "event":
                self._events([message["event"]])
        raise ConnectionClosed(None, None)  # the server ended the stream before the job ended

    def _events(self, events: list[dict[str, Any]]) -> None:
        known = {e.get("seq") for e in self.events}
        for event in events:
            if event.get("seq") in known:
                continue
            self.events.append(event)
            if self.on_event is not None:
                self.on_event(event)


class Playground:
    """The playground of a trained job over ``/ws/playground/<job_id>/`` (the checkpoint of ``report``, or the
    job's latest): ``generate`` text, or ``classify`` with a classifier. Each call opens one socket (the server
    loads the checkpoint once per socket); use ``session`` to send several prompts over one."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def session(self, job_id: int, report: int | None = None) -> PlaygroundSession:
        return PlaygroundSession(self.client, job_id, report)

    def stream(self, job_id: int, prompt: str, report: int | None = None, **options: Any) -> Iterator[str]:
        """The generated pieces of text as the model produces them (options: temperature, top_k, top_p,
        max_tokens, seed)."""
        with self.session(job_id, report) as session:
            yield from session.stream(prompt, **options)

    def generate(self, job_id: int, prompt: str, report: int | None = None, **options: Any) -> str:
        """The whole generated text (see ``stream``)."""
        return "".join(self.stream(job_id, prompt, report, **options))

    def classify(self, job_id: int, text: str, report: int | None = None) -> list[dict[str, Any]]:
        """A classifier's ``[{"label", "p"}]``, most probable first."""
        with self.session(job_id, report) as session:
            return session.classify(text)


class PlaygroundSession:
    """One playground socket; ``ready`` is the server's ``ready`` message (task, labels, limits), ``last_done`` the
    ``done`` message of the last request once it finished (``tokens``, ``seconds``, and for generation ``stopped``:
    ``"eos"`` when the model ended the text, ``"max_tokens"`` or ``"stop"``)."""

    def __init__(self, client: Client, job_id: int, report: int | None) -> None:
        self.ws = open_socket(client, PLAYGROUND_SOCKET.format(job_id=job_id), f"report={report}" if report else "")
        self.ws.__enter__()  # the connection is its own context manager; __exit__ below closes it
        self.ready: dict[str, Any] = {}
        self.last_done: dict[str, Any] | None = None
        try:
            while not self.ready:
                message = self._next()
                if message.get("type") == "ready":
                    self.ready = message
        except BaseException:
            self.ws.close()  # a checkpoint that cannot load (an error naming ``report``): nothing stays open
            raise

    def __enter__(self) -> PlaygroundSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.ws.__exit__(*exc)

    def _next(self) -> dict[str, Any]:
        try:
            message: dict[str, Any] = json.loads(self.ws.recv(timeout=300))
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            raise NetworkError(f"the playground socket failed: {exc}") from exc
        if message.get("type") == "error":
            from moe_builder_client.errors import BadRequest, FieldError

            raise BadRequest(400, [FieldError(str(message.get("field") or ""), str(message.get("message")))])
        return message

    def stream(self, prompt: str, **options: Any) -> Iterator[str]:
        self.last_done = None
        self.ws.send(json.dumps({"type": "generate", "prompt": prompt, **options}))
        while (message := self._next()).get("type") != "done":
            if message.get("type") == "token":
                yield str(message["text"])
        self.last_done = message

    def classify(self, text: str) -> list[dict[str, Any]]:
        self.ws.send(json.dumps({"type": "classify", "text": text}))
        self.last_done = None
        labels: list[dict[str, Any]] = []
        while (message := self._next()).get("type") != "done":
            if message.get("type") == "labels":
                labels = list(message["probabilities"])
        self.last_done = message
        return labels
