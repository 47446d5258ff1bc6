"""Python client of the MoE Builder platform: ``Client`` (configs, datasets, jobs, reports, playground), the typed
exceptions of ``errors``, and the ``moe-builder`` command line (``cli``)."""

from moe_builder_client.client import Client
from moe_builder_client.errors import (
    ApiError,
    AuthenticationError,
    BadRequest,
    ClientError,
    Conflict,
    DatasetInvalid,
    FieldError,
    JobFailed,
    NetworkError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ReportFailed,
    ServerError,
    SpecInvalid,
    TooLarge,
    Unprocessable,
    WaitTimeout,
)
from moe_builder_client.live import JobWatch, Point

__all__ = [
    "ApiError",
    "AuthenticationError",
    "BadRequest",
    "Client",
    "ClientError",
    "Conflict",
    "DatasetInvalid",
    "FieldError",
    "JobFailed",
    "JobWatch",
    "NetworkError",
    "NotFound",
    "PermissionDenied",
    "Point",
    "RateLimited",
    "ReportFailed",
    "ServerError",
    "SpecInvalid",
    "TooLarge",
    "Unprocessable",
    "WaitTimeout",
]
