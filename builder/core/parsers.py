"""Every JSON input of the platform goes through here: a size limit and a depth limit before ``json.loads``.

Python's ``json`` recurses once per nesting level, so ~5,000 nested brackets raise ``RecursionError`` (a 500, or a
crashed websocket consumer) long before any schema sees the value. ``nesting_problem`` measures the depth with one
linear, non-recursive scan of the text that skips string contents, so a bracket inside a string never counts and no
input (an unterminated string, a run of backslashes) makes the scan quadratic.

Three doors, one rule (``JSON_MAX_DEPTH`` levels, ``JSON_MAX_BYTES`` bytes, both settings):

- the API: ``BoundedJSONParser``, the default JSON parser of ``REST_FRAMEWORK``. A body over the size limit is
  ``413`` (``JSONTooLarge``), refused from its Content-Length before it is read, or after reading one byte past the
  limit; malformed or too deeply nested JSON is DRF's ``ParseError`` (400). Both are ``ParseError``s, so every
  endpoint answers them in its own error shape (``builder.core.errors.exception_handler``);
- forms and websockets, which hold the text already: ``load_json(text, field)`` raises ``Refusal(field, message)``;
- serializer fields given JSON as text (a form-encoded ``spec``): ``BoundedJSONField``;
- anything else: ``parse_bounded(text)`` raises ``JSONInputError`` with the message.
"""

from __future__ import annotations

import json
import re
from typing import IO, Any

from django.conf import settings
from rest_framework import renderers, serializers
from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser
from rest_framework.utils.json import strict_constant

# The next character that can change the depth or start a string.
_STRUCTURE = re.compile(r'[\[\]{}"]')
# The rest of a string after its opening quote, up to and including the closing one. Possessive quantifiers
# never backtrack, so a string with no end costs one pass, not one per character.
_STRING_TAIL = re.compile(r'(?:[^"\\]++|\\.)*+"', re.DOTALL)
_OPENING = frozenset("[{")


class JSONInputError(ValueError):
    """JSON text refused before or while parsing; the message says why (for the client, as is)."""


class JSONTooLarge(ParseError):
    """A JSON request body over ``JSON_MAX_BYTES``: 413, answered like any parse error."""

    status_code = 413
    default_detail = "the JSON body is too large"
    default_code = "too_large"


def max_depth() -> int:
    return int(settings.JSON_MAX_DEPTH)


def max_bytes() -> int:
    return int(settings.JSON_MAX_BYTES)


def nesting_problem(text: str, limit: int) -> str | None:
    """Why ``text`` nests arrays/objects deeper than ``limit`` (naming the character where it does), or None.

    Not a validator: brackets that do not balance, or a string with no end, are left for ``json.loads`` to report.
    """
    depth = 0
    position = 0
    while (found := _STRUCTURE.search(text, position)) is not None:
        char = found.group()
        if char == '"':
            tail = _STRING_TAIL.match(text, found.end())
            if tail is None:
                return None  # a string that never ends: the parser names it; nothing after it can nest
            position = tail.end()
            continue
        if char in _OPENING:
            depth += 1
            if depth > limit:
                return f"nested deeper than {limit} levels (at character {found.start() + 1})"
        else:
            depth -= 1
        position = found.end()
    return None


def parse_bounded(text: str, *, depth: int | None = None, size: int | None = None) -> Any:
    """``json.loads(text)`` within the limits (settings when not given); NaN and Infinity are refused.

    Raises ``JSONInputError`` naming the problem: too large, nested too deeply, or not JSON (with line and column).
    """
    size = max_bytes() if size is None else size
    depth = max_depth() if depth is None else depth
    # Characters are at most 4 bytes: only a text that may be over the limit is encoded to measure it.
    if len(text) > size // 4 and len(text.encode("utf-8", "surrogatepass")) > size:
        raise JSONInputError(f"over the limit of {size} bytes")
    problem = nesting_problem(text, depth)
    if problem is not None:
        raise JSONInputError(problem)
    try:
        return json.loads(text, parse_constant=strict_constant)
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        # A number of more than 4300 digits (int's own limit), an out-of-range constant; RecursionError only
        # where a caller allowed a depth the interpreter's stack cannot take.
        raise JSONInputError(f"not JSON ({exc})") from None


def load_json(text: str, field: str) -> Any:
    """``parse_bounded`` for forms and websockets: any problem is ``Refusal(field, message)`` (400)."""
    # Imported here: builder.core.errors imports DRF's views, which import this module (DEFAULT_PARSER_CLASSES).
    from builder.core.errors import Refusal

    try:
        return parse_bounded(text)
    except JSONInputError as exc:
        raise Refusal(field, str(exc)) from None


class BoundedJSONParser(BaseParser):
    """DRF's JSON parser with ``JSON_MAX_BYTES`` and ``JSON_MAX_DEPTH`` (see the module docstring).

    Deliberately not a subclass of DRF's ``JSONParser``: DRF hands that one ``request.body`` (the whole body, read
    into memory first); this one reads the request stream itself, one byte past the limit at most.
    """

    media_type = "application/json"
    renderer_class = renderers.JSONRenderer

    def parse(self, stream: IO[bytes], media_type: str | None = None, parser_context: Any = None) -> Any:
        parser_context = parser_context or {}
        limit = max_bytes()
        request = parser_context.get("request")
        declared = _content_length(request)
        if declared is not None and declared > limit:
            raise JSONTooLarge(f"JSON parse error - the body ({declared} bytes) is over the limit of {limit} bytes")
        raw = stream.read(limit + 1)
        if len(raw) > limit:
            raise JSONTooLarge(f"JSON parse error - the body is over the limit of {limit} bytes")
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ParseError(f"JSON parse error - the body is not {encoding} ({exc})") from None
        try:
            return parse_bounded(text, size=limit)
        except JSONInputError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None


def _content_length(request: Any) -> int | None:
    try:
        return int(request.META.get("CONTENT_LENGTH") or "")
    except (AttributeError, ValueError):
        return None


class BoundedJSONField(serializers.JSONField):
    """DRF's ``JSONField``, except that JSON given as text (a form field, ``binary=True``) is parsed within the
    limits: DRF's own field calls ``json.loads`` on it, which a deeply nested value turns into a 500."""

    def to_internal_value(self, data: Any) -> Any:
        if self.binary or getattr(data, "is_json_string", False):
            try:
                text = data.decode() if isinstance(data, bytes) else str(data)
                return parse_bounded(text)
            except (JSONInputError, UnicodeDecodeError) as exc:
                raise serializers.ValidationError(str(exc)) from None
        return super().to_internal_value(data)


# The largest integer every database here stores (a signed 64-bit column): an id or a count in a URL beyond it
# can match no row, and SQLite raises OverflowError on it instead of finding nothing.
MAX_DB_INT = 2**63 - 1


def db_int(raw: str) -> int | None:
    """``raw`` as a non-negative integer that a database column can hold, or None when it is not one."""
    text = raw.strip()
    if not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if value <= MAX_DB_INT else None
