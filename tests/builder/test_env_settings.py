"""Settings helpers reject bad values loudly; the production profile is strict and passes --deploy checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from builder.env import env_bool, env_choice, env_int, env_list, env_rate, env_str, env_url

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("TRUE", True), ("on", True), ("0", False), ("No", False)])
def test_env_bool_accepts_the_usual_spellings(raw: str, expected: bool) -> None:
    assert env_bool("X", not expected, environ={"X": raw}) is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "tru", "yes please"])
def test_env_bool_rejects_anything_else_naming_the_variable(raw: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"^DEBUG='.*' is not a boolean"):
        env_bool("DEBUG", True, environ={"DEBUG": raw})


def test_env_defaults_apply_only_when_unset_or_blank() -> None:
    assert env_bool("X", True, environ={}) is True
    assert env_bool("X", False, environ={"X": "  "}) is False
    assert env_int("N", 7, environ={}) == 7
    assert env_str("S", "d", environ={"S": ""}) == "d"
    assert env_list("L", ["a"], environ={}) == ["a"]


def test_env_rate_accepts_drf_rates_and_names_the_variable_otherwise() -> None:
    assert env_rate("R", "10/min", environ={}) == "10/min"
    assert env_rate("R", "10/min", environ={"R": " 5/hour "}) == "5/hour"
    for bad in ("5", "five/min", "0/min", "5/fortnight", "-1/s"):
        with pytest.raises(ImproperlyConfigured, match=r"^SIGNIN_FAILURE_RATE='.*' is not a rate like 10/min"):
            env_rate("SIGNIN_FAILURE_RATE", "10/min", environ={"SIGNIN_FAILURE_RATE": bad})


def test_env_int_checks_type_and_bounds() -> None:
    assert env_int("N", 1, minimum=0, maximum=10, environ={"N": "10"}) == 10
    with pytest.raises(ImproperlyConfigured, match="N='ten' is not an integer"):
        env_int("N", 1, environ={"N": "ten"})
    with pytest.raises(ImproperlyConfigured, match="N=-1 is below the minimum 0"):
        env_int("N", 1, minimum=0, environ={"N": "-1"})
    with pytest.raises(ImproperlyConfigured, match="N=11 is above the maximum 10"):
        env_int("N", 1, maximum=10, environ={"N": "11"})


def test_env_list_rejects_empty_items() -> None:
    assert env_list("H", [], environ={"H": "a.example, b.example"}) == ["a.example", "b.example"]
    with pytest.raises(ImproperlyConfigured, match="H='a,,b' has an empty item"):
        env_list("H", [], environ={"H": "a,,b"})


def test_env_choice_and_url() -> None:
    assert env_choice("LOG", "INFO", ("INFO", "DEBUG"), environ={"LOG": "DEBUG"}) == "DEBUG"
    with pytest.raises(ImproperlyConfigured, match="LOG='verbose' is not one of INFO, DEBUG"):
        env_choice("LOG", "INFO", ("INFO", "DEBUG"), environ={"LOG": "verbose"})
    assert env_url("R", "redis://x:1/0", ("redis",), environ={}) == "redis://x:1/0"
    for bad in ("http://x", "redis:/x", "localhost:6379"):
        with pytest.raises(ImproperlyConfigured, match=r"^R="):
            env_url("R", "", ("redis", "rediss"), environ={"R": bad})


def _manage(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # A clean slate for the variables under test (and the browser fixture's async-unsafe switch, which
    # check --deploy rightly refuses).
    unset = {"SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "DJANGO_ALLOW_ASYNC_UNSAFE"}
    base = {k: v for k, v in os.environ.items() if k not in unset}
    base.update({"VAR_DIR": str(tmp_path), **env})
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=base, capture_output=True, text=True, timeout=120
    )


def test_production_requires_a_secret_key(tmp_path: Path) -> None:
    result = _manage(["check"], {"DEBUG": "false", "ALLOWED_HOSTS": "moe.example"}, tmp_path)
    assert result.returncode != 0
    assert "SECRET_KEY is required when DEBUG is off" in result.stderr


def test_a_bad_value_stops_start_up_with_its_name(tmp_path: Path) -> None:
    result = _manage(["check"], {"DEBUG": "sometimes"}, tmp_path)
    assert result.returncode != 0
    assert "DEBUG='sometimes' is not a boolean" in result.stderr


def test_production_profile_passes_check_deploy_with_no_warning(tmp_path: Path) -> None:
    env = {
        "DEBUG": "false",
        "SECRET_KEY": "p" + os.urandom(40).hex(),
        "ALLOWED_HOSTS": "moe.example",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    result = _manage(["check", "--deploy", "--fail-level", "WARNING"], env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_development_defaults_need_no_environment(tmp_path: Path) -> None:
    result = _manage(["check"], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    # The development secret key is generated into VAR_DIR, private, never in the repository.
    key = tmp_path / "secret_key"
    assert key.exists() and oct(key.stat().st_mode & 0o777) == "0o600"
    assert len(key.read_text().strip()) >= 50
