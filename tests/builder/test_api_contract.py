"""The API keeps its contract: Schemathesis against the real server finds no answer outside the published schema.

A stack of its own (Redis, a Celery worker, the ASGI server) shares the test database and storage, with the per-user
job limit and submission rate raised so that work Schemathesis starts is judged on its data, not on a quota. Alice
signs in with an API token; every operation of ``/api/schema`` runs, the ones that start work (jobs, cleaning,
analysis, calibration, reports) included, with a bounded, deterministic number of examples in the examples,
coverage and fuzzing phases. Path parameters name alice's seeded objects (a ready dataset, a saved config, a job
that finished with a report); the operations that delete get objects of their own.

Each check's failures are counted the way ``st run`` counts them (unique failures): a response that violates its
schema, an undocumented status code or content type, a valid request rejected, a server error. All must be 0.

A request that matches the schema may still be refused for what the schema cannot state, and only so: 404 for an
object it names that does not exist, 409 for a state that does not allow it (Schemathesis's defaults), and 422, the
documented answer to a rule between fields or about the data it names (a spec's ``top_k`` above its expert count, a
file whose name and format disagree), and 413 for an upload larger than the user's free quota. A 400 is a failure:
what a 400 refuses, the schema must publish.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from rest_framework.authtoken.models import Token
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events
from schemathesis.engine.statistic import Statistic
from schemathesis.openapi.checks import RejectedPositiveData

from builder.configs.services import create_config, parse_spec
from builder.datasets.models import Dataset
from builder.jobs.models import Job
from builder.reports.models import Report
from tests.builder.test_jobs import CORPUS, tiny_spec
from tests.services import (
    point_at_redis,
    service_env,
    shared_db_path,
    start_asgi,
    start_redis,
    start_worker,
    wait_for,
    wait_worker_ready,
)

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "positive_data_acceptance",
]
# What a schema-valid request may be answered (see the module docstring): Schemathesis's defaults, plus 422, and 413
# for an upload over the user's free storage quota (state of the account; the hard size limit is in the schema).
ACCEPTED_REFUSALS = ["2xx", "3xx", "401", "403", "404", "409", "413", "422", "429", "5xx"]
# Per operation and phase: enough to reach every documented answer, few enough for ~2 minutes on 2 slow cores.
MAX_EXAMPLES = 5
MAX_SECONDS = 100


def _ready_dataset(owner: Any, name: str) -> Dataset:
    stored = default_storage.save(f"datasets/contract/{name}.txt", ContentFile(CORPUS.encode()))
    return Dataset.objects.create(
        owner=owner, name=name, format="txt", file_name=stored, size_bytes=len(CORPUS), state="ready"
    )


def _seed(alice: Any, base_url: str, token: str) -> dict[str, Any]:
    """Alice's objects for the path parameters: a finished job with a succeeded report, a dataset, a config."""
    import requests

    dataset = _ready_dataset(alice, "contract corpus")
    headers = {"Authorization": f"Token {token}"}
    response = requests.post(
        f"{base_url}/api/jobs",
        json={"name": "contract", "spec": tiny_spec(4), "dataset": dataset.pk, "queue": "gpu"},
        headers=headers,
        timeout=30,
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    config = create_config(alice, "contract config", "", parse_spec(tiny_spec(4)), source="api")
    doomed_config = create_config(alice, "to delete", "", parse_spec(tiny_spec(4)), source="api")
    doomed_dataset = _ready_dataset(alice, "to delete")

    def reported() -> Report | None:
        return Report.objects.filter(job_id=job_id, state="succeeded").first()

    began = time.monotonic()
    report = wait_for(reported, 240, f"job {job_id} to finish with a report", interval=0.5)
    assert Job.objects.get(pk=job_id).state == "succeeded"
    print(f"seeded a job and its report in {time.monotonic() - began:.0f}s")
    return {
        "job_id": job_id,
        "report_id": report.pk,
        "dataset_id": dataset.pk,
        "config_id": config.pk,
        "number": 1,
        "doomed_config_id": doomed_config.pk,
        "doomed_dataset_id": doomed_dataset.pk,
    }


def _config(base_url: str, token: str, seeded: dict[str, Any]) -> SchemathesisConfig:
    pinned = {f"path.{k}": seeded[k] for k in ("job_id", "report_id", "dataset_id", "config_id", "number")}
    return SchemathesisConfig.from_dict(
        {
            "seed": 13,
            # Nothing carried over from an earlier run: each run is judged on its own.
            "cache": {"enabled": False},
            "max-time": MAX_SECONDS,
            "headers": {"Authorization": f"Token {token}"},
            "base-url": base_url,
            "workers": 1,
            "request-timeout": 60,
            "checks": {
                "enabled": False,
                **{name: {"enabled": True} for name in CHECKS},
                "positive_data_acceptance": {"enabled": True, "expected-statuses": ACCEPTED_REFUSALS},
            },
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            "parameters": pinned,
            "operations": [
                {
                    "include-path": "/api/configs/{config_id}",
                    "include-method": "DELETE",
                    "parameters": {"path.config_id": seeded["doomed_config_id"]},
                },
                {
                    "include-path": "/api/datasets/{dataset_id}",
                    "include-method": "DELETE",
                    "parameters": {"path.dataset_id": seeded["doomed_dataset_id"]},
                },
            ],
        }
    )


def test_every_operation_answers_within_its_published_contract(
    alice: Any, media_root: Path, tmp_path: Path, artifacts: Path, capsys: Any
) -> None:
    redis_service, url = start_redis(tmp_path / "redis")
    env = service_env(
        url,
        shared_db_path(),
        media_root,
        JOBS_MAX_ACTIVE_PER_USER="1000",
        JOB_SUBMISSION_RATE="100000/hour",
    )
    services = [redis_service]
    point_at_redis(url)
    try:
        worker = start_worker(env, tmp_path, "contract")
        services.append(worker)
        asgi, base_url = start_asgi(env, tmp_path)
        services.append(asgi)
        wait_worker_ready(worker, url)
        token = Token.objects.create(user=alice).key
        seeded = _seed(alice, base_url, token)

        # A body that is not JSON is a problem with the request as a whole, in the shape the configs API documents.
        import requests

        garbage = requests.post(
            f"{base_url}/api/configs",
            data=b"\x00",
            headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
            timeout=30,
        )
        assert garbage.status_code == 400 and garbage.json()["errors"][0]["path"] == "", garbage.text

        config = _config(base_url, token, seeded)
        schema = schemathesis.openapi.from_url(f"{base_url}/api/schema?format=json", config=config)
        began = time.monotonic()
        statistic = Statistic()
        errors: list[str] = []
        for event in schemathesis.engine.from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                statistic.on_scenario_finished(event.recorder)
            elif isinstance(event, events.NonFatalError):
                errors.append(f"{event.label}: {event.info.format()}")
            elif isinstance(event, events.FatalError):
                errors.append(f"fatal: {event.exception!r}")
        took = time.monotonic() - began

        by_title = Counter(type(failure).kind_title for failure in statistic.unique_failures_map)
        details = sorted(
            {
                f"{f.operation}: {f.title}: {f.message}"[:400]
                for f in statistic.unique_failures_map
                if not isinstance(f, RejectedPositiveData)
            }
        )
        rejected = sorted(
            {
                f"{f.operation}: {f.message}"[:400]
                for f in statistic.unique_failures_map
                if isinstance(f, RejectedPositiveData)
            }
        )
        summary = f"schemathesis: {statistic.total_cases} cases in {took:.0f}s; {dict(by_title)}"
        cases = [
            f"{label}: {[f.title for f in group.failures]}\n{group.code_sample}\n"
            f"-> {group.response.status_code if group.response else None} "
            f"{(group.response.text if group.response else '')[:300]}"
            for label, groups in statistic.failures.items()
            for group in groups.values()
        ]
        (artifacts / "api-contract.txt").write_text("\n\n".join([summary, *details, *rejected, *errors, *cases]) + "\n")
        with capsys.disabled():
            print(f"\n{summary} (test-artifacts/api-contract.txt)")
        assert not errors
        assert not details  # schema violations, undocumented status codes and content types, server errors: none
        assert not rejected  # a schema-valid request refused with 400: the schema does not publish a rule
    finally:
        for service in reversed(services):
            service.stop()
