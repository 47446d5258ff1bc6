"""The client's exceptions: the API's refusals as typed exceptions that name the fields at fault.

The API answers a refusal in one of two shapes (the server's ``builder/core/errors.py``): the configs API's
``{"errors": [{"path": "spec.model.moe.top_k", "message": ...}]}``, and elsewhere ``{"field": ["message", ...]}``
or ``{"detail": "message"}``; figures that help to recover may accompany either (``extra``). Both become an
``ApiError`` subclass chosen by the HTTP status, whose ``errors`` are ``FieldError(path, message)`` pairs
(``path`` ``""`` for the request as a whole).

Errors that are not an HTTP answer: ``NetworkError`` (the server could not be reached or stopped answering),
``DatasetInvalid`` (an uploaded file that its validation refused, with the line and field), ``JobFailed`` (a job that
ended failed or cancelled while waited for) and ``ReportFailed``.

The command line maps them to exit codes (``EXIT_CODES``; see ``moe-builder --help``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, NamedTuple

NON_FIELD = "non_field_errors"
# "model.moe.top_k: message": a dotted path (at least one dot) leading a message.
_PATH_PREFIX = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)+): (.+)$", re.DOTALL)


class FieldError(NamedTuple):
    """One problem: ``path`` names the field at fault (dotted, ``""`` for none), ``message`` says what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ClientError(Exception):
    """Base of every exception this package raises."""

    exit_code = 1


class NotSignedIn(ClientError):
    """No server address or token: pass them, set MOE_BUILDER_URL/MOE_BUILDER_TOKEN, or ``moe-builder login``."""

    exit_code = 5


class NetworkError(ClientError):
    """The server could not be reached, or the connection failed or timed out."""

    exit_code = 6


class ApiError(ClientError):
    """The API refused a request: ``status``, the problems (``errors``, each naming its field) and ``extra``."""

    exit_code = 4

    def __init__(self, status: int, errors: list[FieldError], extra: dict[str, Any] | None = None) -> None:
        self.status = status
        self.errors = errors or [FieldError("", f"HTTP {status}")]
        self.extra = extra or {}
        super().__init__(f"HTTP {status}: " + "; ".join(str(e) for e in self.errors))

    @property
    def fields(self) -> list[str]:
        """The paths of the fields at fault, in order (``""`` for a problem of the request as a whole)."""
        return [e.path for e in self.errors]

    def messages(self, path: str) -> list[str]:
        """What is wrong with the field ``path``."""
        return [e.message for e in self.errors if e.path == path]


class BadRequest(ApiError):
    """400: a value that is not allowed; each problem names its field (``spec.model.moe.top_k``)."""


class Unprocessable(BadRequest):
    """422: a request the schema allows that breaks a rule between fields (``top_k`` above the number of experts);
    each problem names its field."""


class AuthenticationError(ApiError):
    """401: no valid token (sign in again: ``moe-builder login``)."""

    exit_code = 5


class PermissionDenied(ApiError):
    """403: signed in, but not allowed (only a job's owner controls it, for example)."""

    exit_code = 5


class NotFound(ApiError):
    """404: no such object, or one that is not yours."""


class Conflict(ApiError):
    """409: the object's state does not allow this now (``extra`` often says the state)."""


class Gone(ApiError):
    """410: an upload that expired; start it again."""


class TooLarge(ApiError):
    """413: a body over the limit for its address."""


class RateLimited(ApiError):
    """429: too many requests; ``retry_after`` seconds to wait (from ``Retry-After``), when the server said."""

    retry_after: float | None = None


class ServerError(ApiError):
    """5xx: the server failed (or a proxy in front of it)."""


class SpecInvalid(BadRequest):
    """A spec that ``validate`` found invalid: ``errors`` name every field at fault."""


class DatasetInvalid(ClientError):
    """An uploaded dataset that its validation refused: the ``line`` (1-based; None when about the whole file), the
    ``field`` the problem is about when the message names one (a JSONL key or CSV column), and the ``message``."""

    exit_code = 3

    def __init__(self, dataset: dict[str, Any], line: int | None, field: str | None, message: str) -> None:
        self.dataset, self.line, self.field, self.reason = dataset, line, field, message
        where = f"line {line}" if line is not None else "the file"
        about = f" (field {field!r})" if field else ""
        super().__init__(f"dataset {dataset.get('id')} is {dataset.get('state')}: {where}{about}: {message}")


class WorkFailed(ClientError):
    """Work the platform did ended failed (a sweep, say)."""

    exit_code = 3


class JobFailed(ClientError):
    """A job waited for ended ``failed`` or ``cancelled``; ``job`` is its last state, ``error`` the reason."""

    exit_code = 3

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.state = str(job.get("state"))
        self.error = str(job.get("error") or "")
        reason = f": {self.error}" if self.error else ""
        super().__init__(f"job {job.get('id')} {self.state}{reason}")


class ReportFailed(ClientError):
    """A report waited for failed; ``report`` is its last state."""

    exit_code = 3

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        super().__init__(f"report {report.get('id')} failed: {report.get('error') or 'no reason given'}")


class WaitTimeout(ClientError):
    """Waiting for a job, report or dataset took longer than the ``timeout`` given."""

    exit_code = 7


BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: TooLarge,
    422: Unprocessable,
    429: RateLimited,
}

# What the command line exits with (scripts can tell these apart); documented in the README and --help.
EXIT_CODES = {
    0: "success",
    1: "an unexpected error",
    2: "wrong usage of the command line (an unknown option, a missing argument)",
    3: "the work failed: a job ended failed or cancelled, a dataset is invalid, a report failed",
    4: "the API refused the request (400, 404, 409, 413, 422, 429, 5xx): the message names the field",
    5: "not signed in or not allowed (401, 403): run `moe-builder login`",
    6: "the server could not be reached (connection refused, timeout)",
    7: "waiting took longer than --timeout",
}


def field_errors(body: Any) -> tuple[list[FieldError], dict[str, Any]]:
    """The problems and the extra figures of an error body, in either of the API's two shapes."""
    if not isinstance(body, dict):
        return ([FieldError("", str(body))] if body else []), {}
    if isinstance(body.get("errors"), list):
        problems = [
            FieldError(str(e.get("path") or ""), str(e.get("message", "")))
            if isinstance(e, dict)
            else FieldError("", str(e))
            for e in body["errors"]
        ]
        return problems, {k: v for k, v in body.items() if k != "errors"}
    problems, extra = [], {}
    for key, value in body.items():
        if key == "detail":
            problems.append(FieldError("", str(value)))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            path = "" if key == NON_FIELD else key
            for message in value:
                # The jobs API files a spec's problems under "spec" as "model.moe.top_k: message" (paths below
                # the spec). Elsewhere a leading path names something else (the spec field a sweep's bound breaks,
                # under "space.0.high"): the message is kept whole.
                inner = _PATH_PREFIX.match(message) if key == "spec" else None
                if inner:
                    problems.append(FieldError(f"{path}.{inner.group(1)}", inner.group(2)))
                else:
                    problems.append(FieldError(path, message))
        elif isinstance(value, dict) and key not in ("state",):
            # DRF nests a field's problems below it, e.g. {"spec": {"model.moe.top_k": ["..."]}}.
            nested, _ = field_errors(value)
            problems.extend(FieldError(f"{key}.{e.path}" if e.path else key, e.message) for e in nested)
        else:
            extra[key] = value
    return problems, extra


def error_for(status: int, body: Any, retry_after: str | None = None) -> ApiError:
    """The exception for an error answer (``status`` ≥ 400) and its decoded ``body``."""
    problems, extra = field_errors(body)
    cls = BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    error = cls(status, problems, extra)
    if isinstance(error, RateLimited) and retry_after:
        with contextlib.suppress(ValueError):
            error.retry_after = float(retry_after)
    return error


# The dataset readers' messages name the field or column they are about (workers/engine/data.py): "missing field
# 'text'", "label column 'stars' is not in the header", "field 'text' must be a string".
_NAMED_FIELD = re.compile(r"(?:field|column) '([^']+)'")


def dataset_invalid(dataset: dict[str, Any]) -> DatasetInvalid:
    """The exception for a dataset whose state is ``invalid`` or ``failed`` (its ``error`` is ``{line, message}``)."""
    error = dataset.get("error") or {}
    message = str(error.get("message") or "validation failed")
    named = _NAMED_FIELD.search(message)
    return DatasetInvalid(dataset, error.get("line"), named.group(1) if named else None, message)
