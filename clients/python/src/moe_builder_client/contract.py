"""Does an OpenAPI schema still describe every operation the client calls? (see ``operations``)

``check(schema)`` returns the problems, one sentence each, empty when the client and the API agree. The project's
test suite runs it against the schema the server publishes; ``Client.compatibility_problems()`` runs it against the
server it talks to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from moe_builder_client.operations import OPERATIONS, Operation

PATH_PARAM = re.compile(r"{(\w+)}")


def _resolve(schema: Mapping[str, Any], node: Any, depth: int = 0) -> dict[str, Any]:
    """``node`` with ``$ref`` followed and ``allOf`` merged (enough for drf-spectacular's output)."""
    if not isinstance(node, Mapping) or depth > 20:
        return {}
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return _resolve(schema, schema.get("components", {}).get("schemas", {}).get(name, {}), depth + 1)
    if "allOf" in node:
        merged: dict[str, Any] = {"properties": {}, "required": []}
        for part in node["allOf"]:
            resolved = _resolve(schema, part, depth + 1)
            merged["properties"].update(resolved.get("properties", {}))
            merged["required"] += resolved.get("required", [])
        return merged
    return dict(node)


def _properties(schema: Mapping[str, Any], node: Any) -> tuple[set[str], set[str]]:
    """The property names and the required ones of an object schema (of its items, for an array)."""
    resolved = _resolve(schema, node)
    if resolved.get("type") == "array":
        resolved = _resolve(schema, resolved.get("items", {}))
    return set(resolved.get("properties", {})), set(resolved.get("required", []))


def check_operation(schema: Mapping[str, Any], name: str, operation: Operation) -> list[str]:
    """The ways ``schema`` differs from what the client's operation ``name`` sends and reads."""
    label = f"{name} ({operation.method} {operation.path})"
    described = schema.get("paths", {}).get(operation.path)
    if described is None:
        return [f"{label}: the schema has no path {operation.path}"]
    spec = described.get(operation.method.lower())
    if spec is None:
        methods = sorted(m.upper() for m in described if m in {"get", "post", "put", "patch", "delete"})
        return [f"{label}: the schema's {operation.path} has no {operation.method} (it has {', '.join(methods)})"]
    problems: list[str] = []
    parameters = [_resolve(schema, p) for p in [*described.get("parameters", []), *spec.get("parameters", [])]]
    in_path = {p["name"] for p in parameters if p.get("in") == "path"}
    wanted_path = set(PATH_PARAM.findall(operation.path))
    if in_path != wanted_path:
        problems.append(f"{label}: path parameters {sorted(in_path)} in the schema, {sorted(wanted_path)} here")
    in_query = {p["name"] for p in parameters if p.get("in") == "query"}
    required_query = {p["name"] for p in parameters if p.get("in") == "query" and p.get("required")}
    for extra in sorted(operation.query - in_query):
        problems.append(f"{label}: the client sends query parameter {extra!r}, which the schema does not have")
    for missing in sorted(required_query - operation.query):
        problems.append(f"{label}: the schema requires query parameter {missing!r}, which the client never sends")

    content = spec.get("requestBody", {}).get("content", {})
    if operation.body_type is not None:
        if operation.body_type not in content:
            problems.append(
                f"{label}: the client sends {operation.body_type}, the schema accepts {sorted(content) or 'no body'}"
            )
        elif operation.body:
            fields, required = _properties(schema, content[operation.body_type].get("schema", {}))
            for extra in sorted(operation.body - fields):
                problems.append(f"{label}: the client sends field {extra!r}, which the schema's request lacks")
            for missing in sorted(required - operation.body):
                problems.append(f"{label}: the schema requires field {missing!r}, which the client never sends")
    elif spec.get("requestBody", {}).get("required"):
        problems.append(f"{label}: the schema requires a request body, the client sends none")

    if operation.reads:
        answers = spec.get("responses", {})
        success = next((answers[code] for code in sorted(answers) if code.startswith("2")), None)
        body = (success or {}).get("content", {}).get("application/json", {}).get("schema")
        if body is None:
            problems.append(f"{label}: the schema describes no JSON success answer; the client reads one")
        else:
            fields, _ = _properties(schema, body)
            for missing in sorted(operation.reads - fields):
                problems.append(f"{label}: the client reads {missing!r}, which the schema's answer lacks")
    return problems


def check(schema: Mapping[str, Any], operations: Mapping[str, Operation] = OPERATIONS) -> list[str]:
    """Every problem of every operation (see the module docstring); ``[]`` when the client matches ``schema``."""
    return [problem for name, operation in operations.items() for problem in check_operation(schema, name, operation)]
