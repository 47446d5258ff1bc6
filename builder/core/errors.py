"""The one way to refuse a request, and the places that turn a refusal into what the client sees.

A service that will not do what it was asked raises ``Refusal``. Each problem names the field at fault (a dotted
path below a nested object, e.g. ``model.moe.top_k``; ``""`` when it is about no one field); the refusal carries
the HTTP status to answer with and any figures the client needs to recover (``extra``, e.g. the free quota).
Services never build responses. A refusal becomes:

- in the API, through ``exception_handler`` (``REST_FRAMEWORK["EXCEPTION_HANDLER"]``), the answer ``status`` with
  ``{field: [message, ...], **extra}``, or ``{"detail": message, **extra}`` when its one problem names no field.
  Views that set ``errors_as_paths = True`` (the configs API) answer ``{"errors": [{"path", "message"}], **extra}``
  instead, and DRF's own validation and parse errors in the same flat shape;
- on a websocket, ``error_frame``: ``{"type": "error", "field", "message"}`` (the socket stays open);
- on a page, whatever the view shows beside its form: ``str(refusal)`` is ``"field: message"`` (``"message"``
  for no field), problems joined by ``"; "``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

# The path of a problem with the submitted data as a whole (DRF's name for it). It is answered like a field,
# ``{"non_field_errors": [message]}``, where a problem with path "" (a refusal of the action itself, usually
# because of the state things are in) is answered ``{"detail": message}``.
NON_FIELD = "non_field_errors"


class FieldError(NamedTuple):
    """One problem: ``path`` names the field at fault ("" for none), ``message`` says what is wrong."""

    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class Refusal(Exception):
    """A request that cannot be honoured: one or more ``errors``, the HTTP ``status``, and ``extra`` data.

    ``Refusal(field, message, status=400, **extra)`` for one problem; ``Refusal.of(errors, ...)`` for several
    (a spec that fails validation names every field at fault).
    """

    errors: tuple[FieldError, ...]
    status: int
    extra: dict[str, Any]

    def __init__(self, field: str, message: str, status: int = 400, **extra: Any) -> None:
        self._set((FieldError(field, message),), status, extra)

    @classmethod
    def of(cls, errors: Iterable[tuple[str, str]], status: int = 400, **extra: Any) -> Refusal:
        """A refusal of several problems, in order; ``errors`` are ``(path, message)`` pairs (at least one)."""
        problems = tuple(FieldError(path, message) for path, message in errors)
        if not problems:
            raise ValueError("a refusal names at least one problem")
        refusal = cls.__new__(cls)
        refusal._set(problems, status, extra)
        return refusal

    def _set(self, errors: tuple[FieldError, ...], status: int, extra: dict[str, Any]) -> None:
        self.errors, self.status, self.extra = errors, status, extra
        self.args = (str(self),)

    def __str__(self) -> str:
        return "; ".join(f"{e.path}: {e.message}" if e.path else e.message for e in self.errors)

    def __reduce__(self) -> tuple[Any, ...]:
        # The constructor's arguments are not ``self.args``: pickle (a Celery result, a worker pool) rebuilds
        # the refusal from its parts instead.
        return (_rebuild, (type(self), self.errors, self.status, self.extra))

    @property
    def field(self) -> str:
        """The path of the first problem ("" for none)."""
        return self.errors[0].path

    @property
    def message(self) -> str:
        """The message of the first problem."""
        return self.errors[0].message

    def by_field(self) -> dict[str, list[str]]:
        """``{path: [message, ...]}`` in order, problems with path "" under ``NON_FIELD`` (DRF's detail shape)."""
        out: dict[str, list[str]] = {}
        for error in self.errors:
            out.setdefault(error.path or NON_FIELD, []).append(error.message)
        return out

    def as_fields(self) -> dict[str, Any]:
        """The API's body: ``{"detail": message}`` for one problem with no field, else ``by_field()``; plus extra."""
        if len(self.errors) == 1 and not self.field:
            return {"detail": self.message, **self.extra}
        return {**self.by_field(), **self.extra}

    def as_paths(self) -> dict[str, Any]:
        """The flat body: ``{"errors": [{"path", "message"}, ...]}`` (``NON_FIELD`` as ""), plus extra."""
        errors = [FieldError("" if e.path == NON_FIELD else e.path, e.message).as_dict() for e in self.errors]
        return {"errors": errors, **self.extra}


# The code a serializer gives a problem that the published schema cannot state (an id naming no object of yours,
# a rule between fields): when every problem of a request has it, the answer is 422 instead of 400.
UNPROCESSABLE = "unprocessable"


class Unprocessable(ValidationError):
    """DRF validation errors answered 422: the request matches its schema but breaks rules it cannot state."""

    status_code = 422


def validated(serializer: Any) -> Any:
    """``serializer.validated_data``, or raise its errors: 422 (``Unprocessable``) when every problem has the code
    ``UNPROCESSABLE``, else 400 (DRF's ``ValidationError``) with all of them."""
    if serializer.is_valid():
        return serializer.validated_data
    codes = serializer.errors and _codes(serializer.errors)
    raise (Unprocessable if codes and codes == {UNPROCESSABLE} else ValidationError)(serializer.errors)


def _codes(detail: Any) -> set[str]:
    if isinstance(detail, dict):
        return {code for value in detail.values() for code in _codes(value)}
    if isinstance(detail, list):
        return {code for item in detail for code in _codes(item)}
    return {getattr(detail, "code", "") or ""}


def _rebuild(cls: type[Refusal], errors: tuple[FieldError, ...], status: int, extra: dict[str, Any]) -> Refusal:
    return cls.of(errors, status, **extra)


def flatten_errors(detail: Any, prefix: str = "") -> list[dict[str, str]]:
    """DRF's nested error detail → ``[{"path", "message"}]`` with dotted paths (``non_field_errors`` and
    ``detail`` name no field: they add nothing to the path)."""
    if isinstance(detail, dict):
        out: list[dict[str, str]] = []
        for key, value in detail.items():
            key = "" if key in (NON_FIELD, "detail") else str(key)
            out.extend(flatten_errors(value, f"{prefix}.{key}" if prefix and key else prefix or key))
        return out
    if isinstance(detail, list):
        return [e for item in detail for e in flatten_errors(item, prefix)]
    return [{"path": prefix, "message": str(detail)}]


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's exception handler (see the module docstring); anything else is left to DRF's own handler."""
    as_paths = getattr(context.get("view"), "errors_as_paths", False)
    if isinstance(exc, Refusal):
        set_rollback()
        return Response(exc.as_paths() if as_paths else exc.as_fields(), status=exc.status)
    if as_paths and isinstance(exc, ValidationError):
        set_rollback()
        return Response({"errors": flatten_errors(exc.detail)}, status=exc.status_code)
    if as_paths and isinstance(exc, ParseError):
        # A body that is not JSON (or is too large or too deep: builder.core.parsers) is a problem with the
        # request as a whole: path "", in the shape these views document for every 400.
        return Response({"errors": flatten_errors(exc.detail)}, status=exc.status_code)
    return drf_exception_handler(exc, context)


def error_frame(refusal: Refusal) -> dict[str, Any]:
    """A websocket's answer to a refused message: the first problem, ``{"type": "error", "field", "message"}``."""
    return {"type": "error", "field": refusal.field, "message": refusal.message}
