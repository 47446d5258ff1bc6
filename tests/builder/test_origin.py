"""Websockets open only from the platform's own address: another port of an allowed host is another origin."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from builder.core.origin import same_origin
from tests.conftest import session_cookie
from tests.services import Stack

CASES = [
    # (origin, Host header, trusted origins, accepted)
    ("http://127.0.0.1:8000", "127.0.0.1:8000", [], True),
    ("http://127.0.0.1:8001", "127.0.0.1:8000", [], False),  # another port of the same host
    ("http://localhost:8000", "127.0.0.1:8000", [], False),  # another name is another origin
    ("https://moe.example.com", "moe.example.com", [], True),  # default ports on both sides
    ("https://moe.example.com:443", "moe.example.com", [], True),
    ("http://moe.example.com", "moe.example.com:8443", [], False),
    ("https://app.example.com", "moe.example.com", ["https://app.example.com"], True),  # CSRF_TRUSTED_ORIGINS
    ("https://app.example.com", "moe.example.com", ["https://other.example.com"], False),
    ("", "127.0.0.1:8000", [], False),  # no Origin: not from a page of ours
    ("null", "127.0.0.1:8000", [], False),
    ("http://127.0.0.1:99999", "127.0.0.1:8000", [], False),  # an impossible port
]


@pytest.mark.parametrize(("origin", "host", "trusted", "accepted"), CASES)
def test_same_origin_compares_host_and_port(origin: str, host: str, trusted: list[str], accepted: bool) -> None:
    assert same_origin(origin, host, trusted) is accepted


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_socket_from_another_port_of_an_allowed_host_is_refused(stack: Stack, alice: Any) -> None:
    ws_url = stack.base_url.replace("http://", "ws://") + "/ws/status/"
    headers = {"Cookie": session_cookie(alice)}
    port = urlsplit(stack.base_url).port
    assert port is not None
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url, additional_headers=headers, origin=Origin(f"http://127.0.0.1:{port + 1}"), open_timeout=10)
    assert refused.value.response.status_code == 403
    with connect(ws_url, additional_headers=headers, origin=Origin(stack.base_url), open_timeout=10) as ws:
        assert ws.recv(timeout=10)  # the platform's own page is accepted
