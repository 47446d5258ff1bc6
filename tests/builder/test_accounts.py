"""Sign-in, sign-out, sign-up (and its switch), API tokens, the local account command."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client
from rest_framework.authtoken.models import Token

pytestmark = pytest.mark.django_db


def test_pages_need_a_signed_in_user(client: Client) -> None:
    for url in ("/", "/configure/", "/status/"):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_sign_in_then_home_then_sign_out(client: Client, alice: Any) -> None:
    response = client.post("/accounts/login/", {"username": "alice", "password": alice.raw_password})
    assert response.status_code == 302
    home = client.get("/")
    assert home.status_code == 200
    assert b'data-testid="username">alice<' in home.content
    for section in (b"Configure", b"Datasets", b"Jobs", b"Reports"):
        assert section in home.content
    assert client.post("/accounts/logout/").status_code == 302
    assert client.get("/").status_code == 302


def test_wrong_password_is_refused(client: Client, alice: Any) -> None:
    response = client.post("/accounts/login/", {"username": "alice", "password": "not-it"})
    assert response.status_code == 200
    assert b"enter a correct username and password" in response.content
    assert client.get("/").status_code == 302


def test_the_home_page_links_every_section_to_its_page(client: Client, alice: Any) -> None:
    client.force_login(alice)
    home = client.get("/").content.decode()
    for name in ("configure", "datasets", "jobs", "reports"):
        assert f'href="/{name}/"' in home
        page = client.get(f"/{name}/")
        assert page.status_code == 200 and b"<h1" in page.content
    assert client.get("/no-such-section/").status_code == 404


def test_signup_creates_an_account_and_signs_in(client: Client, django_user_model: Any) -> None:
    password = "Correct-Horse-9-battery"
    response = client.post("/accounts/signup/", {"username": "bob", "password1": password, "password2": password})
    assert response.status_code == 302
    assert django_user_model.objects.filter(username="bob").exists()
    assert client.get("/").status_code == 200


def test_signup_errors_name_the_field(client: Client) -> None:
    response = client.post("/accounts/signup/", {"username": "bob", "password1": "a", "password2": "b"})
    assert response.status_code == 400
    assert b'data-field="password2"' in response.content


def test_signup_can_be_turned_off(client: Client, settings: Any) -> None:
    settings.SIGNUP_ENABLED = False
    assert client.get("/accounts/signup/").status_code == 404
    assert b"Create one" not in client.get("/accounts/login/").content


def test_api_token_and_session_authentication(client: Client, alice: Any) -> None:
    assert client.get("/api/me").status_code == 401
    bad = client.post("/api/auth/token", {"username": "alice", "password": "wrong"})
    assert bad.status_code == 401 and bad.headers["WWW-Authenticate"].startswith("Token")
    assert client.post("/api/auth/token", {"username": "alice", "password": ""}).status_code == 400  # malformed
    good = client.post("/api/auth/token", {"username": "alice", "password": alice.raw_password})
    assert good.status_code == 200
    token = good.json()["token"]
    assert Token.objects.get(user=alice).key == token
    me = Client().get("/api/me", HTTP_AUTHORIZATION=f"Token {token}")
    assert me.status_code == 200 and me.json()["username"] == "alice"
    assert Client().get("/api/me", HTTP_AUTHORIZATION="Token nope").status_code == 401
    client.force_login(alice)
    assert client.get("/api/me").json()["username"] == "alice"


def test_openapi_schema_and_docs(client: Client, alice: Any) -> None:
    schema = client.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    assert "/api/auth/token" in schema.json()["paths"]
    assert client.get("/api/docs").status_code == 200


def test_ensure_local_user_creates_once_with_a_random_password(settings: Any, tmp_path: Path) -> None:
    settings.VAR_DIR = tmp_path
    out = StringIO()
    call_command("ensure_local_user", stdout=out)
    creds = (tmp_path / "local-credentials.txt").read_text()
    password = creds.split("password: ")[1].strip()
    assert len(password) >= 12
    assert oct((tmp_path / "local-credentials.txt").stat().st_mode & 0o777) == "0o600"
    assert Client().login(username="admin", password=password)
    out2 = StringIO()
    call_command("ensure_local_user", stdout=out2)
    assert "Created" not in out2.getvalue()
    assert (tmp_path / "local-credentials.txt").read_text() == creds
