"""The API's two error shapes (builder/core/errors.py) become the same typed exceptions, naming the fields."""

from __future__ import annotations

from moe_builder_client.errors import (
    AuthenticationError,
    BadRequest,
    Conflict,
    FieldError,
    RateLimited,
    ServerError,
    Unprocessable,
    dataset_invalid,
    error_for,
)


def test_the_configs_shape_keeps_every_path() -> None:
    error = error_for(
        400, {"errors": [{"path": "spec.model.moe.top_k", "message": "too big"}, {"path": "", "message": "x"}]}
    )
    assert isinstance(error, BadRequest)
    assert error.errors == [FieldError("spec.model.moe.top_k", "too big"), FieldError("", "x")]
    assert error.messages("spec.model.moe.top_k") == ["too big"]


def test_the_field_shape_names_fields_detail_and_paths_inside_messages() -> None:
    body = {"spec": ["model.moe.top_k: top_k (9) cannot exceed 4"], "dataset": ["no dataset with id 9"]}
    error = error_for(422, body)
    assert isinstance(error, Unprocessable) and isinstance(error, BadRequest)
    assert error.fields == ["spec.model.moe.top_k", "dataset"]
    about_the_spec = "training.optimizer.lr: Input should be less than or equal to 1"
    bound = error_for(422, {"space.0.high": [about_the_spec]})  # a path inside, but not below space.0.high
    assert bound.errors == [FieldError("space.0.high", about_the_spec)]
    conflict = error_for(409, {"offset": ["expected offset 10, got 0"], "received": 10})
    assert isinstance(conflict, Conflict) and conflict.fields == ["offset"] and conflict.extra == {"received": 10}
    assert error_for(409, {"detail": "this job already ended", "state": "succeeded"}).extra == {"state": "succeeded"}
    assert error_for(400, {"non_field_errors": ["Unable to log in"]}).errors == [FieldError("", "Unable to log in")]


def test_the_status_chooses_the_class() -> None:
    assert isinstance(error_for(401, {"detail": "no"}), AuthenticationError)
    limited = error_for(429, {"detail": "slow down"}, retry_after="12")
    assert isinstance(limited, RateLimited) and limited.retry_after == 12.0
    assert isinstance(error_for(502, "<html>bad gateway</html>"), ServerError)


def test_an_invalid_dataset_names_its_line_and_the_field_its_message_names() -> None:
    invalid = dataset_invalid(
        {"id": 4, "state": "invalid", "error": {"line": 3, "message": "missing field 'text' (fields: body)"}}
    )
    assert (invalid.line, invalid.field) == (3, "text")
    assert "line 3" in str(invalid) and invalid.exit_code == 3
    whole = dataset_invalid({"id": 5, "state": "invalid", "error": {"line": None, "message": "empty file"}})
    assert (whole.line, whole.field) == (None, None)
