"""Every JSON input is parsed within a depth and a size limit: 400 (413 when too large) naming the problem, never a 500.

Python's ``json`` raises RecursionError near 5,000 nested brackets; before ``builder.core.parsers`` every endpoint
below answered 500 to ``{"spec": [[[[...]]]]}``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import override_settings
from rest_framework.test import APIClient

from builder.core.parsers import JSONInputError, nesting_problem, parse_bounded
from builder.jobs.consumers import json_object
from tests.conftest import signed_in

pytestmark = pytest.mark.django_db

DEEP = 5000
DEEP_ARRAY = "[" * DEEP + "]" * DEEP
DEEP_BODY = '{"spec": ' + DEEP_ARRAY + "}"


def test_the_scan_counts_brackets_outside_strings_only() -> None:
    assert nesting_problem('{"a": [[1]]}', 3) is None
    assert nesting_problem('{"a": [[[1]]]}', 3) == "nested deeper than 3 levels (at character 9)"
    # Brackets inside strings, escaped quotes and backslashes do not count.
    assert nesting_problem(r'["[[[[\"[[[[", "\\", "{{{{"]', 1) is None
    # Unbalanced or unterminated input is left for json to report (and reported as not JSON).
    assert nesting_problem('["abc', 1) is None
    with pytest.raises(JSONInputError, match="not JSON"):
        parse_bounded('["abc')
    with pytest.raises(JSONInputError, match="nested deeper than 64 levels"):
        parse_bounded(DEEP_ARRAY)
    with pytest.raises(JSONInputError, match="not JSON"):
        parse_bounded('{"x": NaN}')  # NaN is not JSON (DRF's STRICT_JSON)


def test_the_scan_stays_linear_on_adversarial_text() -> None:
    # A run of escaped quotes with no closing quote: a backtracking string pattern would be quadratic here.
    nasty = '["' + '\\"' * 400_000
    many_strings = '["a",' * 150_000 + '"a"]'
    for text in (nasty, many_strings, "[]" * 400_000):
        began = time.perf_counter()
        nesting_problem(text, 64)
        assert time.perf_counter() - began < 2.0


@pytest.mark.parametrize(
    ("url", "shape"),
    [
        ("/api/specs/validate", "errors"),
        ("/api/specs/estimate", "errors"),
        ("/api/configs", "errors"),
        ("/api/jobs", "detail"),
    ],
)
def test_deeply_nested_json_is_a_400_naming_the_problem_in_the_endpoints_shape(
    alice: Any, url: str, shape: str
) -> None:
    response = signed_in(alice, APIClient).post(url, DEEP_BODY, content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    body = response.json()
    if shape == "errors":
        assert body == {"errors": [{"path": "", "message": body["errors"][0]["message"]}]}
        message = body["errors"][0]["message"]
    else:
        message = body["detail"]
    assert "nested deeper than 64 levels" in message


def test_the_token_endpoint_bounds_json_too() -> None:
    # DRF's token view names its own JSON parser; ours replaces it. Anonymous: the body is parsed before any check.
    response = APIClient().post("/api/auth/token", DEEP_BODY, content_type="application/json")
    assert response.status_code == 400 and "nested deeper than 64 levels" in response.json()["detail"]


def test_a_form_is_refused_where_json_is_read(alice: Any) -> None:
    # The spec-carrying URLs read JSON only (their published request body): a form, whose spec would be text for
    # json.loads, is refused before anything is parsed.
    client = signed_in(alice, APIClient)
    response = client.post("/api/configs", {"name": "deep", "spec": DEEP_ARRAY})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["detail"]
    response = client.post("/api/jobs", {"dataset": 1, "spec": DEEP_ARRAY}, format="multipart")
    assert response.status_code == 415


def test_a_body_that_is_not_json_keeps_the_documented_error_shape(alice: Any) -> None:
    client = signed_in(alice, APIClient)
    response = client.post("/api/configs", b"\x00", content_type="application/json")
    assert response.status_code == 400
    (error,) = response.json()["errors"]
    assert error["path"] == "" and error["message"].startswith("JSON parse error - not JSON")


@override_settings(JSON_MAX_BYTES=4096)
def test_a_body_over_the_size_limit_is_a_413(alice: Any) -> None:
    client = signed_in(alice, APIClient)
    big = '{"name": "x", "description": "' + "a" * 5000 + '", "spec": {}}'
    response = client.post("/api/configs", big, content_type="application/json")
    assert response.status_code == 413
    assert "over the limit of 4096 bytes" in response.json()["errors"][0]["message"]
    response = client.post("/api/jobs", big, content_type="application/json")
    assert response.status_code == 413 and "over the limit of 4096 bytes" in response.json()["detail"]


def test_the_comparison_form_and_the_estimate_panel_refuse_deep_json(alice: Any) -> None:
    client = signed_in(alice)
    response = client.post(
        "/configure/compare/",
        {"c": ["template:tiny-cpu-demo", "template:tiny-cpu-demo"], "inline_1": DEEP_ARRAY},
    )
    assert response.status_code == 400
    assert b"inline_1: column 2: nested deeper than 64 levels" in response.content
    response = client.post("/configure/estimate/", {"spec": DEEP_ARRAY})
    assert response.status_code == 400 and b"spec: nested deeper than 64 levels" in response.content


def test_a_deeply_nested_websocket_frame_is_not_a_json_object() -> None:
    assert json_object('{"type": "resync", "after": ' + DEEP_ARRAY + "}") is None
    assert json_object('{"type": "resync", "after": 3}') == {"type": "resync", "after": 3}
