"""Websockets accept an API token (header or subprotocol) with the same access checks as a session, and a socket
that presents a token is judged by it alone: never by its cookie (builder/accounts/socket_auth.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rest_framework.authtoken.models import Token
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin, Subprotocol

from builder.accounts.socket_auth import presented_token
from builder.jobs.models import Job
from tests.conftest import session_cookie
from tests.services import Stack

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def _job_of(owner: Any, shared_with: Any) -> Job:
    job = Job.objects.create(owner=owner, name="finished", spec={}, data_source="datasets/x.txt", state="succeeded")
    job.shared_with.add(shared_with)
    return job


def _url(stack: Stack, job: Job) -> str:
    return stack.base_url.replace("http://", "ws://") + f"/ws/jobs/{job.pk}/"


def _history(ws: Any) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(ws.recv(timeout=10))
    assert message["type"] == "history"
    return message


def test_a_token_in_the_header_opens_a_socket_with_no_origin_for_whoever_may_see_the_job(
    stack: Stack, alice: Any, bob: Any, charlie: Any
) -> None:
    job = _job_of(alice, shared_with=bob)
    for person in (alice, bob):  # the owner, and the colleague it is shared with
        key = Token.objects.create(user=person).key
        with connect(_url(stack, job), additional_headers={"Authorization": f"Token {key}"}, open_timeout=10) as ws:
            assert _history(ws)["job"]["id"] == job.pk
    outsider = Token.objects.create(user=charlie).key
    with pytest.raises(InvalidStatus) as refused:
        connect(_url(stack, job), additional_headers={"Authorization": f"Token {outsider}"}, open_timeout=10)
    assert refused.value.response.status_code == 403


def test_a_token_subprotocol_is_answered_with_the_platform_subprotocol_never_the_key(
    stack: Stack, alice: Any, bob: Any
) -> None:
    job = _job_of(alice, shared_with=bob)
    key = Token.objects.create(user=alice).key
    offered = [Subprotocol("moe-builder"), Subprotocol(f"token.{key}")]
    # A browser sends its page's Origin, whatever it is: the token, not the page, says who this is.
    elsewhere = Origin("https://elsewhere.example")
    with connect(_url(stack, job), subprotocols=offered, origin=elsewhere, open_timeout=10) as ws:
        assert ws.subprotocol == "moe-builder"
        assert _history(ws)["job"]["id"] == job.pk


def test_a_socket_that_presents_a_token_is_never_judged_by_its_cookie(
    stack: Stack, alice: Any, bob: Any, charlie: Any
) -> None:
    """A hostile page cannot ride alice's cookie by adding a bad token (or its author's own) to skip the Origin
    check."""
    job = _job_of(alice, shared_with=bob)
    her_cookie = {"Cookie": session_cookie(alice)}
    evil = Origin("https://evil.example")
    attempts: list[dict[str, Any]] = [
        {"additional_headers": {**her_cookie, "Authorization": "Token not-a-key"}, "origin": evil},
        {"additional_headers": {**her_cookie, "Authorization": "Bearer whatever"}, "origin": evil},
        {
            "additional_headers": her_cookie,
            "subprotocols": [Subprotocol("moe-builder"), Subprotocol("token.0000")],
            "origin": evil,
        },
        {
            "additional_headers": {**her_cookie, "Authorization": f"Token {Token.objects.create(user=charlie).key}"},
            "origin": evil,
        },
        {"additional_headers": her_cookie},  # no token and no Origin: a browser socket must come from our page
        {"additional_headers": her_cookie, "origin": evil},
    ]
    for attempt in attempts:
        with pytest.raises(InvalidStatus) as refused:
            connect(_url(stack, job), open_timeout=10, **attempt)
        assert refused.value.response.status_code == 403, attempt
    with connect(_url(stack, job), additional_headers=her_cookie, origin=Origin(stack.base_url), open_timeout=10) as ws:
        assert _history(ws)["job"]["id"] == job.pk  # her own page with her cookie still works


@pytest.mark.parametrize(
    ("headers", "subprotocols", "expected"),
    [
        ([(b"authorization", b"Token abc")], [], ("abc", False)),
        ([(b"Authorization", b"token  abc ")], [], ("abc", False)),
        ([(b"authorization", b"Basic abc")], [], ("", False)),  # presented but unusable: anonymous, not the cookie
        ([], ["moe-builder", "token.abc"], ("abc", True)),
        ([(b"cookie", b"sessionid=x")], ["moe-builder"], None),
        ([], [], None),
    ],
)
def test_presented_token_reads_the_header_then_the_subprotocols(
    headers: list[tuple[bytes, bytes]], subprotocols: list[str], expected: tuple[str, bool] | None
) -> None:
    assert presented_token({"headers": headers, "subprotocols": subprotocols}) == expected
