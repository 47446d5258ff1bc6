"""The API's published contract: every operation documents the refusals it can answer, in their real shapes.

``AutoSchema`` (``REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]``) adds, to what a view declares with ``extend_schema``,
the error answers that ``builder.core.errors.exception_handler`` and DRF give every view of its kind:

- 400 for a request with a body or query parameters that does not match this schema; 422 for one that matches it
  but breaks a rule the schema cannot express (a rule between fields, such as a spec's ``top_k`` against its
  expert count, or one about the data it names, such as a file's contents): the message names the field and the
  rule; 413 and 415 for one with a body (too large: ``builder.core.parsers``, ``builder.core.body_limits``; a media
  type the URL does not read: JSON unless its request body lists others); 409 for a change the state of things does
  not allow (an object that is busy, a name that is taken);
- 401 and 403 for a view that needs a signed-in user; 404 for a URL that names an object (another person's object
  answers 404 too); 429 for a view with a rate limit (``Retry-After`` says when to try again).

Their bodies: ``Detail`` (``{"detail": message, ...}``) for 401/403/404/415/429; for 400/409/413/422 ``FieldErrors``
(``{field: [message, ...]}`` or ``{"detail": message}``), or ``PathErrors`` (``{"errors": [{"path", "message"}]}``)
in views that set ``errors_as_paths``, which answer their own refusals in that shape at every status. A code a view
declares itself is left as the view declares it.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular import openapi
from drf_spectacular.utils import OpenApiResponse, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import AllowAny

UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


class PathErrorSerializer(serializers.Serializer[dict[str, Any]]):
    path = serializers.CharField(help_text="Dotted field path, e.g. model.moe.top_k ('' for the request as a whole).")
    message = serializers.CharField()


DETAIL = inline_serializer("Detail", {"detail": serializers.CharField()})
# Declared inline: a serializer class cannot have a field called "errors" (it is a Serializer property).
PATH_ERRORS = inline_serializer("PathErrors", {"errors": PathErrorSerializer(many=True)})
FIELD_ERRORS: dict[str, Any] = {
    "type": "object",
    "description": 'Messages by field: {"field": ["message", ...]}, "non_field_errors" for the data as a whole; '
    'or {"detail": "message"} for a refusal of the request itself. Figures that help to recover may accompany '
    "either.",
    "properties": {
        "detail": {"type": "string"},
        "non_field_errors": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": True,
}
DESCRIPTIONS = {
    "400": "The request is malformed or names a value that is not allowed; each problem names its field.",
    "401": "Not signed in: send a session cookie or `Authorization: Token <token>`.",
    "403": "Signed in, but not allowed to do this (for example, only the owner may).",
    "404": "No such object, or one that is not yours.",
    "409": "The object's state does not allow this now.",
    "413": "The request body is over the limit for this URL.",
    "415": "The body's media type is not one this URL reads (see its request body).",
    "422": "The request matches the schema but breaks a rule the schema cannot express (between fields, or about "
    "the data or objects it names); each problem names its field and the rule.",
    "429": "Too many requests: try again after `Retry-After` seconds.",
}
PATHS_ANY: dict[str, Any] = {
    "anyOf": [{"$ref": "#/components/schemas/Detail"}, {"$ref": "#/components/schemas/PathErrors"}]
}


# DRF refuses a NUL character in any text field, and trims a text field with Python's ``str.strip`` before its
# blank check: a required text must hold a character that is not Python whitespace. JSON Schema's ``minLength``
# says neither; these patterns (anchored, so the same in Python's and ECMAScript's regular expressions) do.
_WHITESPACE = "\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
NO_NUL = "^[^\\x00]*$"
NOT_ONLY_WHITESPACE = f"^[^\\x00]*[^\\x00{_WHITESPACE}][^\\x00]*$"


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's schema, plus each operation's error answers (see the module docstring)."""

    def _map_serializer_field(self, field: Any, direction: Any, bypass_extensions: bool = False) -> Any:
        schema = super()._map_serializer_field(field, direction, bypass_extensions)
        if direction == "request" and isinstance(field, serializers.FileField) and not field.allow_empty_file:
            schema = {**schema, "minLength": 1}  # DRF refuses an empty file
        if (
            direction == "request"
            and type(field) is serializers.CharField
            and isinstance(schema, dict)
            and "pattern" not in schema
        ):
            schema["pattern"] = NOT_ONLY_WHITESPACE if field.trim_whitespace and not field.allow_blank else NO_NUL
        return schema

    def _error_codes(self, operation: dict[str, Any]) -> list[str]:
        codes = []
        has_query = any(p.get("in") == "query" for p in operation.get("parameters", []))
        has_body = "requestBody" in operation or self.method in ("POST", "PUT", "PATCH")
        if has_body or has_query:
            codes += ["400", "422"]
        permissions = self.view.get_permissions()
        if permissions and not any(isinstance(p, AllowAny) for p in permissions):
            codes += ["401", "403"]
        if "{" in self.path:
            codes.append("404")
        if self.method in UNSAFE and ("{" in self.path or has_body):
            codes.append("409")  # a change the state of things does not allow now (a taken name, a busy object)
        if has_body:
            codes.append("413")
        if "requestBody" in operation:
            codes.append("415")
        if self.view.get_throttles():
            codes.append("429")
        return codes

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is None:
            return None
        request_body = operation.get("requestBody")
        if request_body is not None and set(request_body.get("content", {})) == {"application/octet-stream"}:
            request_body["required"] = True  # a raw byte body (a chunk) is the request itself
        as_paths = getattr(self.view, "errors_as_paths", False)
        responses = operation.setdefault("responses", {})
        for code in self._error_codes(operation):
            if code in responses:
                continue
            if as_paths:
                body: Any = PATH_ERRORS if code == "400" else PATHS_ANY
                if body is PATHS_ANY:
                    # Register both components before referring to them.
                    self._get_response_for_code(DETAIL, code)
                    self._get_response_for_code(PATH_ERRORS, code)
            else:
                body = FIELD_ERRORS if code in ("400", "409", "413", "422") else DETAIL
            responses[code] = self._get_response_for_code(OpenApiResponse(body, description=DESCRIPTIONS[code]), code)
        return operation
