"""A throwaway PostgreSQL server for the tests, and a runner that points a command at it.

``python -m tests.postgres -- pytest tests/builder/...`` starts a real PostgreSQL (the server binaries of the
machine: ``initdb``, ``pg_ctl``, ``postgres``) in a fresh folder on a free loopback port, runs the command with
``TEST_DATABASE_URL`` set to it (tests/conftest.py then points pytest-django's test database, and every worker and
ASGI server the tests start, at that server), stops the server and removes the folder, and exits with the
command's status.

Without the binaries it prints why and exits 0 (a machine with no PostgreSQL still passes ``make test``), unless
``POSTGRES_REQUIRED=true`` (CI sets it: there the binaries are part of the image, and their absence is an error).

``initdb`` refuses to run as root: as root the server runs as the ``postgres`` user (``runuser``) on a folder it
owns. The cluster is for tests only: it trusts loopback connections and runs with ``fsync=off`` (nothing in it
must survive a crash of the machine).
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BINARIES = ("initdb", "pg_ctl", "postgres")
# Where Debian and the image put PostgreSQL's server binaries (they are not on PATH by default on Debian).
SEARCH = ("/usr/local/bin", "/usr/lib/postgresql/*/bin")


def find_bindir() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``: from ``PG_BINDIR``, PATH, or Debian's places."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for pattern in SEARCH:
        candidates.extend(sorted(glob.glob(pattern), reverse=True))  # the newest major version first
    for folder in filter(None, candidates):
        if all(os.access(Path(folder, name), os.X_OK) for name in BINARIES):
            return Path(folder)
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_postgres(bindir: Path, workdir: Path | None = None) -> Iterator[str]:
    """A PostgreSQL server on a free loopback port, for the duration of the block; yields its database URL
    (user ``postgres``, database ``moe``, no password: loopback connections are trusted)."""
    root = os.geteuid() == 0
    # As root, under /tmp unless told otherwise: the postgres user must be able to reach the folder (root's own
    # TMPDIR, e.g. under /root, is closed to it).
    owner = Path(tempfile.mkdtemp(prefix="moe-pg-", dir=workdir or ("/tmp" if root else None)))
    data, socket_dir = owner / "data", owner / "run"
    as_user: list[str] = []
    if root:
        # initdb and postgres refuse root: run them as the postgres user, on folders it owns.
        account = pwd.getpwnam("postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
        owner.chmod(0o755)
        for folder in (data, socket_dir):
            folder.mkdir()
            os.chown(folder, account.pw_uid, account.pw_gid)
    else:
        socket_dir.mkdir()
    port = _free_port()
    log = owner / "postgres.log"

    def run(*argv: str) -> None:
        subprocess.run([*as_user, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        # Tests only: no fsync (nothing must survive a machine crash), enough connections for the concurrency
        # tests (20 threads) beside the workers and ASGI servers they start.
        options = f"-h 127.0.0.1 -p {port} -k {socket_dir} -c fsync=off -c full_page_writes=off -c max_connections=200"
        if as_user:
            log.touch()
            os.chown(log, pwd.getpwnam("postgres").pw_uid, -1)
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        try:
            _create_database(port)
            yield f"postgres://postgres@127.0.0.1:{port}/moe"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
    except subprocess.CalledProcessError as exc:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{exc.cmd[len(as_user)]} failed: {exc.stderr.decode(errors='replace')}\n{tail}") from None
    finally:
        shutil.rmtree(owner, ignore_errors=True)


def _create_database(port: int) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
                conn.execute("CREATE DATABASE moe")
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    bindir = find_bindir()
    if bindir is None:
        reason = f"no PostgreSQL server binaries ({', '.join(BINARIES)}) in PG_BINDIR, PATH or {', '.join(SEARCH)}"
        if os.environ.get("POSTGRES_REQUIRED", "").lower() in {"1", "true", "yes", "on"}:
            print(f"PostgreSQL tests: {reason}, and POSTGRES_REQUIRED is set", file=sys.stderr)
            return 1
        print(f"PostgreSQL tests skipped: {reason}")
        return 0
    with running_postgres(bindir) as url:
        print(f"PostgreSQL {bindir}: {url}", flush=True)
        return subprocess.run(command, env={**os.environ, "TEST_DATABASE_URL": url}, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
