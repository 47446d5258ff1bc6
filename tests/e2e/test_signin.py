"""A person signs in with Chromium through the real ASGI server and sees the home page and the status page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.services import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_sign_in_and_see_home_and_live_status(stack: Stack, page: Any, alice: Any, artifacts: Path) -> None:
    page.goto(f"{stack.base_url}/")
    assert "/accounts/login/" in page.url
    page.fill("#id_username", "alice")
    page.fill("#id_password", alice.raw_password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.base_url}/")
    assert page.locator("[data-testid=username]").inner_text() == "alice"
    assert page.locator("h1").inner_text() == "Build a Mixture-of-Experts model"
    for section in ("Configure", "Datasets", "Jobs", "Reports"):
        assert page.locator("nav.nav a", has_text=section).is_visible()
    # The bundle built by the Makefile is served: styles applied (dark top bar).
    assert page.locator("header.topbar").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(17, 24, 39)"
    page.screenshot(path=str(artifacts / "home.png"), full_page=True)

    page.click("text=Status")
    page.wait_for_selector("#health-updated:has-text('Live')", timeout=20000)
    table = page.locator("[data-testid=health-table]").inner_text()
    assert page.locator("#overall").inner_text().lower() == "ok", table
    assert page.locator("tr[data-service=celery] .pill").inner_text().lower() == "ok"
    # Each queue with the devices its class trains on (the test stack's default classes run on the CPU).
    assert page.locator("tr[data-service=celery] [data-queue=gpu]").inner_text() == "gpu on CPU"
    page.screenshot(path=str(artifacts / "status.png"), full_page=True)

    page.click("text=Sign out")
    page.wait_for_url("**/accounts/login/")


def test_wrong_password_shows_an_error(stack: Stack, page: Any, alice: Any) -> None:
    page.goto(f"{stack.base_url}/accounts/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "wrong-password")
    page.click("button[type=submit]")
    assert "correct username and password" in page.locator("[role=alert]").inner_text()
