"""Large request bodies are refused before they are read, through the real ASGI server (uvicorn), with its memory
measured: anonymous ones with 401, oversized ones with 413, declared or chunked."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from rest_framework.authtoken.models import Token

from tests.builder.test_datasets_upload_memory import PeakRss
from tests.conftest import session_cookie
from tests.services import Stack

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

MiB = 1024 * 1024
SIZE = 200 * MiB


def _post(base_url: str, path: str, headers: dict[str, str], size: int, *, chunked: bool = False) -> tuple[int, Any]:
    """Send a request whose body is ``size`` bytes (streamed by a thread, as fast as the server takes it) and read
    the answer; returns (status, JSON body). The body is never held in memory here either."""
    url = urlsplit(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    lines = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", "Content-Type: application/octet-stream"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    block = b"x" * MiB

    def stream() -> None:
        with contextlib.suppress(OSError):  # the server answers and closes without reading: the send breaks
            sent = 0
            while sent < size:
                piece = block[: size - sent]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    answer = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    sock.close()
    sender.join(timeout=30)
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, {"unparsed": (head + b"\n\n" + body[:300]).decode("latin-1")}


def _length(answer: bytes) -> int:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":")[1])
    return 0


def _server(stack: Stack) -> list[psutil.Process]:
    assert stack.asgi is not None
    root = psutil.Process(stack.asgi.pid)
    return [root, *root.children(recursive=True)]


def test_large_bodies_are_refused_before_they_are_read_with_bounded_memory(stack: Stack, alice: Any) -> None:
    token = Token.objects.create(user=alice).key
    cases = [
        # (who, path, headers, chunked, expected status)
        ("anonymous", "/api/datasets", {}, False, 401),
        ("anonymous", "/api/auth/token", {}, False, 413),  # open to anonymous, but over the default limit
        ("anonymous, chunked", "/api/datasets", {}, True, 401),
        ("signed in", "/api/datasets", {"Cookie": session_cookie(alice)}, False, 413),
        ("with a token", "/api/configs", {"Authorization": f"Token {token}"}, False, 413),
        ("with a token, chunked", "/api/configs", {"Authorization": f"Token {token}"}, True, 413),
    ]
    before = sum(p.memory_info().rss for p in _server(stack))
    peak = PeakRss(lambda: _server(stack))
    peak.start()
    for who, path, headers, chunked, expected in cases:
        began = time.monotonic()
        status, body = _post(stack.base_url, path, headers, SIZE, chunked=chunked)
        took = time.monotonic() - began
        assert status == expected, (who, path, status, body)
        assert "detail" in body, body
        assert took < 10, (who, path, took)  # answered without receiving 200 MB (and without waiting for it)
        print(f"{who} {path}: {status} in {took:.2f} s")
    growth = peak.stop() - before
    print(f"server RSS growth over the six 200 MB requests: {growth / MiB:.1f} MiB")
    assert growth < 50 * MiB, f"the server grew by {growth / MiB:.0f} MiB"
    # Small anonymous requests still get Django's own answers (a login page, a 401 naming the problem).
    status, body = _post(stack.base_url, "/api/datasets", {}, 10)
    assert status in (401, 403) and "detail" in body
