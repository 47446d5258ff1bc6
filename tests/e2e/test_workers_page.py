"""Alice opens the workers page in Chromium: the session's worker with the hardware it found, then a worker that
starts training her job appears without a reload, with her job's name as a link, and the heartbeat ages tick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from builder.fleet import registry
from builder.fleet.models import Worker
from tests.builder.test_workers_page import A100, SECRET, _busy_with_alices_job, _worker
from tests.conftest import sign_in
from tests.services import Stack, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_the_workers_page_is_live(stack: Stack, page: Any, alice: Any, artifacts: Path, settings: Any) -> None:
    wait_for(lambda: Worker.objects.filter(name__startswith="worker@").exists(), 60, "the session worker's row")
    sign_in(page, stack.base_url, alice)
    page.click("nav.nav a:has-text('Workers')")
    page.wait_for_selector("#workers-updated:has-text('Live')", timeout=20000)
    session_row = page.locator("tr[data-worker^='worker@']")
    hardware_cell = session_row.locator("[data-cell=hardware]").inner_text()
    assert "(cpu)" in hardware_cell
    # The CPU's native bf16 units as the worker read them (AMX, AVX-512 BF16: issue 18), in the live row too.
    found = Worker.objects.get(name=session_row.get_attribute("data-worker")).hardware
    units = found.get("bf16_units") or []
    assert (f"bf16 ({', '.join(units)})" in hardware_cell) if units else ("bf16" not in hardware_cell), hardware_cell
    assert session_row.locator("[data-cell=job]").inner_text() == "idle"
    # Its queues with what their classes train on: with no QUEUE_HARDWARE the default class gpu is the CPU's too.
    assert session_row.locator("[data-cell=queues]").inner_text().splitlines() == ["cpu on CPU", "gpu on CPU"]

    # A worker of an 8-GPU class starts training alice's job: the page shows it without a reload.
    busy = _worker("a100@gpu-host-7", A100, ["gpu.a100x8"])
    job = _busy_with_alices_job(alice, busy)
    registry.publish_change()
    link = page.locator("tr[data-worker='a100@gpu-host-7'] [data-cell=job] a")
    link.wait_for(timeout=20000)
    assert link.inner_text() == SECRET and link.get_attribute("href") == f"/jobs/{job.pk}/"
    age = page.locator("tr[data-worker='a100@gpu-host-7'] [data-heartbeat-at]")
    first = age.inner_text()
    page.wait_for_function(
        "([el, before]) => el.textContent !== before", arg=[age.element_handle(), first], timeout=5000
    )  # the age ticks in the browser between pushes
    page.screenshot(path=str(artifacts / "workers.png"), full_page=True)
