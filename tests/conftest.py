"""Fixtures: the real services of tests/services.py, a browser, and the named people of every test."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar, overload

import dj_database_url
import pytest
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.test import Client

from tests.services import (
    ARTIFACTS,
    Stack,
    point_at_redis,
    service_env,
    shared_database_url,
    start_asgi,
    start_moto,
    start_redis,
    start_worker,
    wait_worker_ready,
)


def _use_test_database_url() -> None:
    """With ``TEST_DATABASE_URL`` set (``python -m tests.postgres`` sets it), the tests run against that database
    server instead of the settings' ``DATABASE_URL``: pytest-django creates its test database there, and the
    workers and ASGI servers the tests start use the same one (``tests.services.shared_database_url``).

    pytest-django loads the settings before this module: the settings' dict is changed in place (the connection
    handler holds the same dict), and the connection object already made for the old engine is dropped (nothing
    has connected through it yet) so that the next use makes one for the new engine."""
    url = os.environ.get("TEST_DATABASE_URL", "").strip()
    if not url:
        return
    database = settings.DATABASES["default"]
    parsed = dj_database_url.parse(url)
    database.update(parsed)
    database["OPTIONS"] = parsed.get("OPTIONS", {})  # the SQLite pragmas mean nothing to another engine
    database["TEST"] = {**database.get("TEST", {}), "NAME": None}  # named per session (below)
    with contextlib.suppress(AttributeError):  # none was made
        del connections[DEFAULT_DB_ALIAS]


_use_test_database_url()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A file-based SQLite test database, so the worker and ASGI subprocesses share it with the tests. On a
    database server, a test database named after this session's process, so that two sessions on one server
    (two people, or CI beside a person) never drop each other's."""
    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        path = tmp_path_factory.mktemp("db") / "test.sqlite3"
        database["TEST"]["NAME"] = str(path)
    else:
        database.setdefault("TEST", {})["NAME"] = f"test_{database['NAME']}_{os.getpid()}"


@pytest.fixture(autouse=True)
def _cache_of_its_own(settings: Any) -> None:
    """Each test counts rate limits in a cache of its own (a local one), so that no test is throttled by the
    attempts of another, nor by a Redis left over from ``make run``. Tests of the limits themselves point
    ``CACHES`` at a real Redis (tests/builder/test_rate_limits.py); the services' processes use their Redis."""
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": os.urandom(8).hex()}
    }


@pytest.fixture(scope="session")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from django.test.signals import setting_changed

    path = tmp_path_factory.mktemp("media")
    settings.MEDIA_ROOT = path
    settings.JOBS_WORK_DIR = tmp_path_factory.mktemp("jobs")
    # Storage objects cache their location on first use; Django's own signal (what override_settings sends)
    # makes them re-read it.
    setting_changed.send(sender=type(settings), setting="MEDIA_ROOT", value=path, enter=True)
    return path


@pytest.fixture(scope="session")
def stack(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory, media_root: Path
) -> Iterator[Stack]:
    """The session's services: Redis, one worker on ``gpu`` and ``cpu``, and the ASGI server."""
    workdir = tmp_path_factory.mktemp("services")
    redis_service, url = start_redis(workdir / "redis")
    point_at_redis(url)
    with django_db_blocker.unblock():
        database = shared_database_url()
    env = service_env(url, database, media_root)
    result = Stack(redis=redis_service, redis_url=url, env=env)
    try:
        result.worker = start_worker(env, workdir, "worker")
        result.asgi, result.base_url = start_asgi(env, workdir)
        wait_worker_ready(result.worker, url)
        yield result
    finally:
        result.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3 endpoint (moto's server on loopback, stopped by PID at the end); yields its URL."""
    service, endpoint = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield endpoint
    finally:
        service.stop()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not Path(executable).exists():
        pytest.fail(f"{executable} is missing: install Debian's chromium (apt-get install -y chromium)")
    # Playwright's sync API runs an event loop in this thread; the ORM calls the tests make between
    # browser steps are plain blocking calls, which Django would otherwise refuse.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as pw:
        instance = pw.chromium.launch(
            executable_path=executable,
            headless=True,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
            ],
        )  # fmt: skip
        yield instance
        instance.close()
    if previous is None:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    tab.set_default_timeout(15000)
    yield tab
    context.close()


# --- The named people of every test, and how they sign in ---------------------------------------------------------

ClientT = TypeVar("ClientT", bound=Client)


def _person(django_user_model: Any, username: str) -> Any:
    """A user with a per-run password (never fixed in the repository), kept as ``raw_password`` for sign-in forms."""
    password = os.urandom(9).hex()
    user = django_user_model.objects.create_user(username=username, password=password)
    user.raw_password = password
    return user


@pytest.fixture
def alice(django_user_model: Any) -> Any:
    """Alice owns things in tests."""
    return _person(django_user_model, "alice")


@pytest.fixture
def bob(django_user_model: Any) -> Any:
    """Bob is alice's colleague: she shares things with him (he sees them, he controls nothing)."""
    return _person(django_user_model, "bob")


@pytest.fixture
def charlie(django_user_model: Any) -> Any:
    """Charlie is the outsider: signed in, but owns nothing of alice's and is shared nothing."""
    return _person(django_user_model, "charlie")


@overload
def signed_in(user: Any) -> Client: ...


@overload
def signed_in(user: Any, client_class: type[ClientT]) -> ClientT: ...


def signed_in(user: Any, client_class: type[Client] = Client) -> Client:
    """A test client (Django's, or e.g. DRF's ``APIClient``) with ``user`` signed in by session, as a browser is."""
    client = client_class()
    client.force_login(user)
    return client


def session_cookie(user: Any) -> str:
    """The ``Cookie`` header of a session of ``user``: for websocket clients outside Django's test client."""
    return f"sessionid={signed_in(user).cookies['sessionid'].value}"


def sign_in(page: Any, base_url: str, user: Any) -> None:
    """Sign ``user`` in through the login form of the server at ``base_url``, in a Playwright ``page``."""
    page.goto(f"{base_url}/accounts/login/")
    page.fill("#id_username", user.get_username())
    page.fill("#id_password", user.raw_password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base_url}/")
