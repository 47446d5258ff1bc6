"""The one refusal type and the one exception handler: every shape a client sees, from plain views.

The views here raise what services raise; the real endpoints' shapes are checked by each app's tests.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import JSONParser
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory
from rest_framework.views import APIView

from builder.core.errors import NON_FIELD, Refusal, error_frame

factory = APIRequestFactory()


class Raises(APIView):
    """POST raises ``problem``; the body is parsed first (so a malformed body is DRF's ParseError)."""

    permission_classes = [AllowAny]
    parser_classes = [JSONParser]
    problem: Exception | None = None

    def post(self, request: Request) -> Response:
        request.data  # noqa: B018  (parsing is what may fail)
        assert self.problem is not None
        raise self.problem


class RaisesAsPaths(Raises):
    errors_as_paths = True


class SignedInOnly(APIView):
    permission_classes = [IsAuthenticated]

    def get(self, request: Request) -> Response:
        return Response({})


def answer(view: type[APIView], problem: Exception, body: str = "{}") -> tuple[int, Any]:
    response = view.as_view(problem=problem)(factory.post("/x", body, content_type="application/json"))
    response.render()
    return response.status_code, json.loads(response.content)


def test_a_refusal_naming_a_field_answers_its_status_with_the_field_and_its_message() -> None:
    assert answer(Raises, Refusal("offset", "expected offset 40, got 0", 409)) == (
        409,
        {"offset": ["expected offset 40, got 0"]},
    )
    assert answer(Raises, Refusal("name", "taken")) == (400, {"name": ["taken"]})


def test_a_refusal_naming_no_field_is_a_detail_and_non_field_errors_is_a_field() -> None:
    assert answer(Raises, Refusal("", "the dataset is validating; wait for it to finish", 409)) == (
        409,
        {"detail": "the dataset is validating; wait for it to finish"},
    )
    assert answer(Raises, Refusal(NON_FIELD, "you already have 2 active jobs")) == (
        400,
        {"non_field_errors": ["you already have 2 active jobs"]},
    )


def test_extra_data_travels_beside_the_errors() -> None:
    quota = {"used_bytes": 600, "quota_bytes": 1000, "free_bytes": 400}
    assert answer(Raises, Refusal("size", "storage quota exceeded", 413, **quota)) == (
        413,
        {"size": ["storage quota exceeded"], **quota},
    )
    assert answer(Raises, Refusal("", "the job already succeeded", 409, state="succeeded")) == (
        409,
        {"detail": "the job already succeeded", "state": "succeeded"},
    )
    assert answer(RaisesAsPaths, Refusal("name", "taken", received=3)) == (
        400,
        {"errors": [{"path": "name", "message": "taken"}], "received": 3},
    )


def test_several_field_errors_keep_their_order_in_both_shapes() -> None:
    refusal = Refusal.of([("model.moe.top_k", "too big"), ("", "a cross-field rule"), ("spec", "one"), ("spec", "two")])
    assert answer(Raises, refusal) == (
        400,
        {"model.moe.top_k": ["too big"], "non_field_errors": ["a cross-field rule"], "spec": ["one", "two"]},
    )
    assert answer(RaisesAsPaths, refusal) == (
        400,
        {
            "errors": [
                {"path": "model.moe.top_k", "message": "too big"},
                {"path": "", "message": "a cross-field rule"},
                {"path": "spec", "message": "one"},
                {"path": "spec", "message": "two"},
            ]
        },
    )
    assert answer(RaisesAsPaths, Refusal(NON_FIELD, "the request as a whole")) == (
        400,
        {"errors": [{"path": "", "message": "the request as a whole"}]},
    )


def test_drf_errors_keep_drf_shapes_except_validation_and_parse_errors_of_path_views() -> None:
    nested = ValidationError({"spec": {"model.moe.top_k": ["too big"]}, "non_field_errors": ["whole"]})
    assert answer(Raises, nested) == (400, {"spec": {"model.moe.top_k": ["too big"]}, "non_field_errors": ["whole"]})
    assert answer(RaisesAsPaths, nested) == (
        400,
        {"errors": [{"path": "spec.model.moe.top_k", "message": "too big"}, {"path": "", "message": "whole"}]},
    )
    status, body = answer(Raises, Refusal("", "never raised: parsing fails first"), body="{not json")
    assert status == 400 and set(body) == {"detail"} and "JSON parse error" in body["detail"]
    # A body that does not parse is a problem with the request as a whole: path "" in the flat shape.
    status, body = answer(RaisesAsPaths, Refusal("", "never raised: parsing fails first"), body="{not json")
    assert status == 400 and [e["path"] for e in body["errors"]] == [""]
    assert "JSON parse error" in body["errors"][0]["message"]
    response = SignedInOnly.as_view()(factory.get("/x"))
    assert (response.status_code, response["WWW-Authenticate"]) == (401, "Token")
    assert response.data == {"detail": "Authentication credentials were not provided."}


def test_a_refusal_reads_as_text_pickles_and_becomes_a_websocket_frame() -> None:
    one = Refusal("report", "this job has no checkpoint yet")
    assert (one.field, one.message, one.status, one.extra) == ("report", "this job has no checkpoint yet", 400, {})
    assert str(one) == "report: this job has no checkpoint yet"
    assert str(Refusal("", "the job already failed", 409)) == "the job already failed"
    several = Refusal.of([("a", "x"), ("", "y")], 413, free_bytes=4)
    assert str(several) == "a: x; y"
    copy = pickle.loads(pickle.dumps(several))
    assert (copy.errors, copy.status, copy.extra, str(copy)) == (several.errors, 413, {"free_bytes": 4}, "a: x; y")
    assert error_frame(one) == {"type": "error", "field": "report", "message": "this job has no checkpoint yet"}
    with pytest.raises(ValueError):
        Refusal.of([])
