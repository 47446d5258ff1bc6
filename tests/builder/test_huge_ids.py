"""An id or a count in a URL larger than any database integer is refused (400/404), never a 500: SQLite raises
OverflowError on such a number (found by the API contract test: GET /api/reports?job=6518275700690105925632)."""

from __future__ import annotations

from typing import Any

import pytest

from builder.configs.models import Config, ConfigVersion
from builder.jobs.models import Job
from tests.conftest import signed_in

HUGE = "6518275700690105925632"


@pytest.mark.django_db
def test_numbers_beyond_a_database_integer_are_refused_not_a_server_error(alice: Any) -> None:
    client = signed_in(alice)
    job = Job.objects.create(owner=alice, name="j", spec={}, data_source="d.txt", queue="gpu")
    config = Config.objects.create(owner=alice, name="c")
    ConfigVersion.objects.create(config=config, number=1, spec={})
    assert client.get(f"/api/reports?job={HUGE}").status_code == 400
    assert client.get(f"/api/jobs/{job.pk}/metrics?after={HUGE}").status_code == 400
    diff = client.get(f"/api/configs/{config.pk}/diff?a={HUGE}&b=1")
    assert diff.status_code == 400 and "a version number is required" in diff.content.decode()
    overlay = client.get(f"/jobs/compare/?ids={job.pk}&ids={HUGE}")
    assert overlay.status_code == 400 and "is not a job id" in overlay.content.decode()  # names ids, as a form would
    assert client.get(f"/jobs/new/?config_version={HUGE}").status_code in (200, 404)  # the form ignores it
    # Ordinary numbers keep working.
    assert client.get(f"/api/reports?job={job.pk}").status_code == 200
    assert client.get(f"/api/jobs/{job.pk}/metrics?after=0").status_code == 200


@pytest.mark.django_db
def test_an_api_url_that_matches_no_operation_answers_json(alice: Any) -> None:
    # A malformed id (not digits) matches no URL pattern: the answer is the API's JSON 404, not Django's HTML page.
    for url in ("/api/jobs/abc", "/api/jobs/-1/metrics", "/api/nothing/here"):
        response = signed_in(alice).get(url)
        assert response.status_code == 404 and response["Content-Type"] == "application/json", url
        assert url in response.json()["detail"]
    assert signed_in(alice).get("/jobs/abc/").status_code == 404  # pages keep their HTML 404
