"""A person uploads a file in Chromium, watches the progress bar, and reads the statistics page; a malformed file
shows its line and reason."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from tests.conftest import sign_in
from tests.services import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _reviews(path: Path, rows: int) -> None:
    rng = random.Random(2)
    words = [
        "kettle",
        "boils",
        "fast",
        "slow",
        "loud",
        "quiet",
        "great",
        "poor",
        "handle",
        "lid",
        "cheap",
        "sturdy",
        "leaks",
        "works",
        "broke",
        "again",
    ]
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 120)))
            f.write(json.dumps({"review": text, "stars": rng.choice(["1", "2", "3", "4", "5"]), "id": i}) + "\n")


def test_upload_shows_progress_then_statistics(
    stack: Stack, page: Any, alice: Any, artifacts: Path, tmp_path: Path
) -> None:
    upload = tmp_path / "kettle-reviews.jsonl"
    _reviews(upload, 6000)  # about 2.5 MB
    sign_in(page, stack.base_url, alice)
    page.click("nav.nav >> text=Datasets")
    page.wait_for_url(f"{stack.base_url}/datasets/")
    assert page.locator("nav.nav a[aria-current=page]").inner_text() == "Datasets"

    page.set_input_files("#upload-file", str(upload))
    # The column picker read the first record: the text field is the string field, no "label" field to guess.
    page.wait_for_selector("#upload-columns-hint:not([hidden])")
    assert "review, stars, id" in page.locator("#upload-columns-hint").inner_text()
    assert page.input_value("#upload-text-field") == "review"
    page.fill("#upload-label-field", "stars")
    page.fill("#upload-name", "Kettle reviews")

    # Throttle the upload (about 1 MB/s) so that the bar is seen moving, as on a real network.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 20, "downloadThroughput": -1, "uploadThroughput": 1_000_000},
    )
    page.click("#upload-submit")
    page.wait_for_selector("#upload-progress-box:not([hidden])")
    page.wait_for_function(
        "() => { const v = document.querySelector('#upload-progress').value; return v > 5 && v < 95; }"
    )
    assert re.search(r"of 2\.\d MB \(\d+%\)", page.locator("#upload-progress-text").inner_text())
    page.screenshot(path=str(artifacts / "dataset-upload-progress.png"))
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )

    # Completion opens the dataset's page; it follows the worker and shows the statistics when it is done.
    page.wait_for_url(re.compile(r".*/datasets/\d+/$"), timeout=60000)
    page.wait_for_selector("[data-testid=dataset-stats]", timeout=60000)
    assert page.locator("[data-testid=dataset-state]").inner_text().lower() == "ready"
    assert page.locator("[data-testid=stat-examples]").inner_text() == "6,000"
    assert page.locator("[data-testid=length-histogram] svg rect").count() >= 3
    assert page.locator("[data-testid=label-chart] svg rect").count() == 5
    assert page.locator("[data-testid=sample-rows] tbody tr").count() == 10
    page.screenshot(path=str(artifacts / "dataset-stats.png"), full_page=True)

    # Clean it into a new version from the page; the report appears when the worker is done.
    page.click("#clean summary")
    page.fill("#id_min_chars", "40")
    page.locator("#clean").screenshot(path=str(artifacts / "dataset-clean-form.png"))
    page.click("#clean button[type=submit]")
    page.wait_for_selector("[data-testid=cleaning-report]", timeout=60000)
    assert "kept" in page.locator("[data-testid=cleaning-report]").inner_text()
    page.screenshot(path=str(artifacts / "dataset-cleaned.png"), full_page=True)

    # The list: the built-in corpora (made by the same command `make run` runs) and alice's two versions.
    call_command("ensure_demo_datasets", stdout=io.StringIO())
    page.click("nav.nav >> text=Datasets")
    assert page.locator("[data-testid=builtin-datasets] tbody tr").count() == 2
    assert page.locator("[data-testid=own-datasets] tbody tr").count() == 2
    page.screenshot(path=str(artifacts / "dataset-list.png"), full_page=True)
    assert not page.locator("#upload-progress-box").is_visible()  # no bar before an upload starts

    page.click("text=Standard-library docstring families")
    assert "pydoc" not in page.locator("[data-testid=dataset-description]").inner_text()
    assert "docstring" in page.locator("[data-testid=dataset-description]").inner_text()
    assert page.locator("[data-testid=label-chart] svg rect").count() == 8
    page.screenshot(path=str(artifacts / "dataset-builtin.png"), full_page=True)


def test_a_malformed_file_shows_its_line(stack: Stack, page: Any, alice: Any, artifacts: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": "oops", }\n')
    sign_in(page, stack.base_url, alice)
    page.goto(f"{stack.base_url}/datasets/")
    page.set_input_files("#upload-file", str(bad))
    page.click("#upload-submit")
    page.wait_for_selector("[data-testid=dataset-error]", timeout=60000)
    assert "line 3" in page.locator("[data-testid=dataset-error]").inner_text()
    assert page.locator("[data-testid=dataset-error-message]").inner_text().startswith("invalid JSON")
    page.screenshot(path=str(artifacts / "dataset-invalid.png"), full_page=True)

    # A refusal before any byte is sent names its field in the form.
    page.goto(f"{stack.base_url}/datasets/")
    other = tmp_path / "notes.bin"
    other.write_bytes(b"hello")
    page.set_input_files("#upload-file", str(other))
    page.click("#upload-submit")
    page.wait_for_selector("[data-error-for=format]:not([hidden])")
    assert "cannot tell the format" in page.locator("[data-error-for=format]").inner_text()
