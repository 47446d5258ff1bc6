"""The Python client cannot drift from the API: every operation it calls is checked against the OpenAPI schema the
server publishes (drf-spectacular's, generated here from the same views), and the check catches a change."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

import pytest
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from moe_builder_client import Client
from moe_builder_client.contract import check
from moe_builder_client.operations import OPERATIONS


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """What ``GET /api/schema?format=json`` answers (the same generator, renderer and views)."""
    generated = SchemaGenerator().get_schema(request=None, public=True)
    loaded: dict[str, Any] = json.loads(OpenApiJsonRenderer().render(generated))
    return loaded


def test_every_operation_the_client_calls_is_in_the_published_schema_as_the_client_calls_it(
    schema: dict[str, Any],
) -> None:
    assert check(schema) == []
    # The check covered the whole table (method, path, parameters, request fields, fields read).
    assert len(OPERATIONS) >= 35


def _changed(schema: dict[str, Any], change: Any) -> list[str]:
    mutated = copy.deepcopy(schema)
    change(mutated)
    return check(mutated)


def _component(schema: dict[str, Any], ref_holder: dict[str, Any]) -> dict[str, Any]:
    name = ref_holder["$ref"].rsplit("/", 1)[-1]
    component: dict[str, Any] = schema["components"]["schemas"][name]
    return component


def test_a_change_of_the_api_is_a_named_problem(schema: dict[str, Any]) -> None:
    def drop_cancel(s: dict[str, Any]) -> None:
        del s["paths"]["/api/jobs/{job_id}/cancel"]

    def cancel_becomes_put(s: dict[str, Any]) -> None:
        paths = s["paths"]["/api/jobs/{job_id}/cancel"]
        paths["put"] = paths.pop("post")

    def rename_after(s: dict[str, Any]) -> None:
        for parameter in s["paths"]["/api/jobs/{job_id}/metrics"]["get"]["parameters"]:
            if parameter["name"] == "after":
                parameter["name"] = "since"

    def require_new_field(s: dict[str, Any]) -> None:
        body = s["paths"]["/api/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        component = _component(s, body)
        component["properties"]["priority"] = {"type": "integer"}
        component.setdefault("required", []).append("priority")

    def drop_sent_field(s: dict[str, Any]) -> None:
        body = s["paths"]["/api/datasets/uploads"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        del _component(s, body)["properties"]["label_field"]

    def drop_read_field(s: dict[str, Any]) -> None:
        answer = s["paths"]["/api/datasets/uploads"]["post"]["responses"]["201"]["content"]["application/json"]
        del _component(s, answer["schema"])["properties"]["chunk_size"]

    def bytes_become_multipart(s: dict[str, Any]) -> None:
        content = s["paths"]["/api/datasets/uploads/{session_id}"]["put"]["requestBody"]["content"]
        content["multipart/form-data"] = content.pop("application/octet-stream")

    cases = [
        (drop_cancel, "job_cancel (POST /api/jobs/{job_id}/cancel): the schema has no path"),
        (cancel_becomes_put, "job_cancel (POST /api/jobs/{job_id}/cancel): the schema's /api/jobs/{job_id}/cancel "
         "has no POST"),
        (rename_after, "metrics (GET /api/jobs/{job_id}/metrics): the client sends query parameter 'after'"),
        (require_new_field, "job_create (POST /api/jobs): the schema requires field 'priority'"),
        (drop_sent_field, "upload_start (POST /api/datasets/uploads): the client sends field 'label_field'"),
        (drop_read_field, "upload_start (POST /api/datasets/uploads): the client reads 'chunk_size'"),
        (bytes_become_multipart, "upload_chunk (PUT /api/datasets/uploads/{session_id}): the client sends "
         "application/octet-stream"),
    ]  # fmt: skip
    for change, expected in cases:
        problems = _changed(schema, change)
        assert any(p.startswith(expected) for p in problems), (change.__name__, problems)


def test_the_client_sends_only_what_its_operation_lists() -> None:
    """What the drift check covers is what goes on the wire: an unlisted parameter is refused before sending."""
    with Client("http://127.0.0.1:9", token="x") as client, pytest.raises(TypeError, match="bogus"):
        client.call("metrics", job_id=1, query={"after": 0, "bogus": 1})


def test_the_client_imports_neither_django_nor_torch() -> None:
    """It installs and runs on its own: importing it (and its command line) loads none of the platform's stack."""
    code = (
        "import sys, moe_builder_client, moe_builder_client.cli; "
        "print(sorted(m for m in ('django', 'torch', 'rest_framework', 'builder', 'workers', 'celery') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
