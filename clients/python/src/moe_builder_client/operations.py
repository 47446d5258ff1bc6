"""Every API operation the client calls, as the server's OpenAPI schema (``/api/schema``) must describe it.

The client sends requests only through this table (``Client.call`` refuses a query parameter or body field that its
operation does not list), and ``moe_builder_client.contract.check`` compares the table with a schema: a missing
operation, another method or path, a parameter or request field the schema does not have, a required one the client
cannot send, or a response field the client reads that the schema no longer returns is a problem. The project's
tests run that check against the schema the server publishes, so the client cannot drift from the API unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

JSON = "application/json"
MULTIPART = "multipart/form-data"
BYTES = "application/octet-stream"


@dataclass(frozen=True)
class Operation:
    """One HTTP operation: ``path`` is the schema's template (``/api/jobs/{job_id}``); ``query`` and ``body`` the
    parameters and request fields the client may send (``body_type`` their content type); ``reads`` the fields of
    the (first) success answer the client relies on."""

    method: str
    path: str
    query: frozenset[str] = field(default_factory=frozenset)
    body: frozenset[str] = field(default_factory=frozenset)
    body_type: str | None = None
    reads: frozenset[str] = field(default_factory=frozenset)

    def url(self, **path_params: object) -> str:
        return self.path.format(**path_params)


def op(
    method: str,
    path: str,
    query: str = "",
    body: str = "",
    body_type: str | None = None,
    reads: str = "",
) -> Operation:
    """An ``Operation`` from space-separated names (the table below reads better so)."""
    if body and body_type is None:
        body_type = JSON
    return Operation(
        method, path, frozenset(query.split()), frozenset(body.split()), body_type, frozenset(reads.split())
    )


JOB_READS = "id state step total_steps error progress"
OPERATIONS: dict[str, Operation] = {
    # Accounts
    "token": op("POST", "/api/auth/token", body="username password", reads="token"),
    "me": op("GET", "/api/me", reads="id username"),
    # Configurations
    "templates": op("GET", "/api/templates", reads="name title spec"),
    "template": op("GET", "/api/templates/{name}", reads="name title spec dataset"),
    "validate": op("POST", "/api/specs/validate", body="spec hardware num_gpus", reads="valid errors warnings spec"),
    "estimate": op(
        "POST", "/api/specs/estimate", body="spec hardware num_gpus parallelism dataset_tokens", reads="estimate"
    ),
    "configs": op("GET", "/api/configs", reads="id name latest_version"),
    "config_create": op("POST", "/api/configs", body="name description spec note source", reads="id latest_version"),
    "config": op("GET", "/api/configs/{config_id}", reads="id name latest_version spec"),
    "config_update": op("PATCH", "/api/configs/{config_id}", body="name description spec note", reads="id"),
    "config_delete": op("DELETE", "/api/configs/{config_id}"),
    "versions": op("GET", "/api/configs/{config_id}/versions", reads="id number"),
    "version_create": op("POST", "/api/configs/{config_id}/versions", body="spec note source", reads="id number"),
    "version": op("GET", "/api/configs/{config_id}/versions/{number}", reads="id number spec"),
    "diff": op("GET", "/api/configs/{config_id}/diff", query="a b", reads="changes"),
    # Datasets
    "datasets": op("GET", "/api/datasets", reads="id name slug state"),
    "dataset": op("GET", "/api/datasets/{dataset_id}", reads="id name state error"),
    "dataset_delete": op("DELETE", "/api/datasets/{dataset_id}"),
    "upload_start": op(
        "POST",
        "/api/datasets/uploads",
        body="filename size name description format text_field label_field",
        reads="id chunk_size received",
    ),
    "upload_status": op("GET", "/api/datasets/uploads/{session_id}", reads="received size complete chunk_size dataset"),
    "upload_chunk": op("PUT", "/api/datasets/uploads/{session_id}", query="offset", body_type=BYTES, reads="received"),
    "upload_complete": op("POST", "/api/datasets/uploads/{session_id}/complete", reads="id state"),
    "upload_abort": op("DELETE", "/api/datasets/uploads/{session_id}"),
    # Jobs
    "jobs": op("GET", "/api/jobs", reads="id name state"),
    "job_create": op(
        "POST", "/api/jobs", body="name spec config_version dataset queue init_checkpoint", reads=JOB_READS
    ),
    "job": op("GET", "/api/jobs/{job_id}", reads=JOB_READS),
    "job_cancel": op("POST", "/api/jobs/{job_id}/cancel", reads="state"),
    "job_resume": op("POST", "/api/jobs/{job_id}/resume", reads="state"),
    "metrics": op("GET", "/api/jobs/{job_id}/metrics", query="after limit", reads="points next_after"),
    "events": op("GET", "/api/jobs/{job_id}/events", query="after"),
    "metrics_csv": op("GET", "/api/jobs/{job_id}/metrics.csv"),
    "tensorboard": op("GET", "/api/jobs/{job_id}/tensorboard.tar.gz"),
    # Reports
    "job_reports": op("GET", "/api/jobs/{job_id}/reports", reads="id state checkpoint_step"),
    "report_create": op("POST", "/api/jobs/{job_id}/reports", body="step", reads="id state"),
    "reports": op("GET", "/api/reports", query="job state", reads="id job state"),
    "report": op("GET", "/api/reports/{report_id}", reads="id job state error metrics downloads huggingface"),
    "report_file": op("GET", "/api/reports/{report_id}/{name}"),
    "report_artifact": op("GET", "/api/reports/{report_id}/artifacts/{name}"),
    # Sweeps
    "sweeps": op("GET", "/api/sweeps", reads="id name state"),
    "sweep_create": op(
        "POST",
        "/api/sweeps",
        body="name config_version dataset space objective budget parallelism pruner queue seed first_trials",
        reads="id state",
    ),
    "sweep": op("GET", "/api/sweeps/{sweep_id}", reads="id state running trials best importances counts"),
    "sweep_stop": op("POST", "/api/sweeps/{sweep_id}/stop", reads="state"),
    "sweep_save_best": op("POST", "/api/sweeps/{sweep_id}/save-best", body="note", reads="id number"),
}

# Websocket routes (not in the OpenAPI schema; the consumers' docstrings are their contract).
JOB_SOCKET = "/ws/jobs/{job_id}/"
PLAYGROUND_SOCKET = "/ws/playground/{job_id}/"
