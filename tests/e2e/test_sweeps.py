"""A person opens a sweep's page: the trials table, the charts, a new trial arriving live over the websocket, and
"save the best trial as a configuration", in Chromium against the real ASGI server. The sweep's rows are seeded (its
run through real workers is tests/builder/test_sweeps.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from builder.configs.models import Config, ConfigVersion
from builder.datasets.models import Dataset
from builder.jobs.models import Job
from builder.sweeps.models import Sweep, Trial
from builder.sweeps.work import publish
from tests.builder.test_sweeps import LR, TINY, TOP_K
from tests.conftest import sign_in
from tests.services import Stack, wait_for
from workers.engine.spec import load_spec

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _trial(sweep: Sweep, number: int, state: str, lr: float, top_k: int, objective: float | None, reason: str) -> Trial:
    job = Job.objects.create(
        owner=sweep.owner, name=f"tune · trial {number}", spec=sweep.base_spec, data_source="datasets/x.txt",
        queue="gpu", state="succeeded" if state == "complete" else "cancelled", step=30, total_steps=30,
    )  # fmt: skip
    return Trial.objects.create(
        sweep=sweep, number=number, job=job, params={LR: lr, TOP_K: top_k}, state=state, objective=objective,
        reason=reason,
    )  # fmt: skip


def test_the_sweep_page_shows_its_trials_live_and_saves_the_best(
    stack: Stack, page: Any, alice: Any, artifacts: Path
) -> None:
    config = Config.objects.create(owner=alice, name="tiny moe")
    spec = load_spec(TINY).model_dump(mode="json")
    version = ConfigVersion.objects.create(config=config, number=1, spec=spec)
    dataset = Dataset.objects.create(
        owner=alice, name="corpus", format="txt", file_name="datasets/x.txt", state="ready"
    )
    sweep = Sweep.objects.create(
        owner=alice, name="tune lr", config_version=version, base_spec=spec, dataset=dataset, queue="gpu",
        space=[{"path": LR, "kind": "float", "low": 1e-6, "high": 1e-2, "log": True},
               {"path": TOP_K, "kind": "choice", "choices": [1, 2]}],
        budget=5, parallelism=2, study_name="e2e-page", state="waiting",
        importances={LR: 0.93, TOP_K: 0.07},
    )  # fmt: skip
    _trial(sweep, 0, "complete", 3e-3, 2, 3.32, "")
    _trial(sweep, 1, "complete", 2e-3, 1, 3.61, "")
    _trial(sweep, 2, "pruned", 1e-6, 2, 5.54, "pruned at step 10: val_loss 5.54 is above the median of finished trials")
    sign_in(page, stack.base_url, alice)
    page.goto(f"{stack.base_url}/sweeps/{sweep.pk}/")
    page.wait_for_selector("[data-field=live]:has-text('live')")
    assert page.locator("nav [aria-current=page]").inner_text() == "Sweeps"
    assert page.locator("[data-trials] tr").count() == 3
    assert page.locator("[data-trial='0']").get_attribute("class") == "best-trial"
    assert page.locator("[data-trial='2'] .s-pruned").count() == 1
    assert "pruned at step 10" in page.locator("[data-trial='2']").inner_text()
    assert (
        page.locator("[data-trial='1'] a").get_attribute("href")
        == f"/jobs/{Trial.objects.get(sweep=sweep, number=1).job_id}/"
    )
    assert page.locator("[data-chart=parallel]").get_attribute("data-lines") == "2"
    assert "training.optimizer.lr: 93%" in page.locator("[data-field=importances-note]").inner_text()

    # A tick records a new trial and publishes: the page shows it without a reload.
    _trial(sweep, 3, "complete", 1e-3, 2, 3.1, "")
    Sweep.objects.filter(pk=sweep.pk).update(state="finished")
    publish(sweep.pk)
    page.wait_for_selector("[data-trial='3'].best-trial")
    assert page.locator("[data-field=best]").inner_text() == "3.1 (trial 3)"
    assert page.locator("[data-action=stop]").is_hidden()  # a finished sweep has nothing to stop
    page.screenshot(path=str(artifacts / "sweep-page.png"), full_page=True)

    page.click("[data-action=save-best]")
    page.wait_for_selector("[data-saved]:not([hidden])")
    saved = ConfigVersion.objects.get(config=config, number=2)
    assert saved.note.startswith('best trial 3 of sweep "tune lr": val_loss 3.1')
    assert saved.spec["training"]["optimizer"]["lr"] == 1e-3 and saved.spec["model"]["moe"]["top_k"] == 2
    assert "version 2" in page.locator("[data-saved]").inner_text()


def test_the_wizard_lets_the_platform_tune_the_learning_rate(stack: Stack, page: Any, alice: Any) -> None:
    """From the wizard's proposal to a sweep of its learning rate: "Save and let the platform tune the learning
    rate", the plan, "Start the sweep", the sweep's page."""
    from builder.datasets.demo import CORPUS_SLUG

    Dataset.objects.create(
        name="built-in corpus", slug=CORPUS_SLUG, origin="builtin", format="txt", file_name="datasets/c.txt",
        size_bytes=10, state="ready",
    )  # fmt: skip
    sign_in(page, stack.base_url, alice)
    page.goto(f"{stack.base_url}/configure/wizard/")
    page.check("input[name=task][value=generation]")
    page.click("[data-testid=next]")
    page.wait_for_selector("[data-testid=wizard-step-2]")
    page.check("input[name=data_size][value=tiny]")
    page.click("[data-testid=next]")
    page.wait_for_selector("[data-testid=wizard-step-3]")
    page.select_option("select[name=hardware]", "cpu")
    page.click("[data-testid=next]")
    page.wait_for_selector("[data-testid=wizard-step-4]")
    page.check("input[name=priority][value=quality]")
    page.click("[data-testid=next]")
    page.wait_for_selector("[data-testid=proposal]")
    page.fill("#id_name", "tuned by the platform")
    page.click("[data-testid=save-and-tune]")
    page.wait_for_selector("[data-testid=tune-plan]")
    config = Config.objects.get(owner=alice, name="tuned by the platform")
    assert page.url.endswith(f"/sweeps/tune-lr/{config.pk}/")
    assert "the proposal's" in page.locator("[data-testid=tune-plan]").inner_text()
    page.click("[data-testid=start-sweep]")
    page.wait_for_selector("[data-sweep-page]")
    sweep = Sweep.objects.get(owner=alice)
    assert page.url.endswith(f"/sweeps/{sweep.pk}/") and sweep.config_version == config.latest
    assert sweep.first_trials == [{LR: config.latest.spec["training"]["optimizer"]["lr"]}]
    # Its trials would train on the session's worker: stop it (the tick cancels whatever it submitted).
    page.click("[data-action=stop]")
    page.wait_for_selector("[data-field=state]:has-text('stopped')", timeout=60000)
    assert Sweep.objects.get(pk=sweep.pk).state == "stopped"
    wait_for(lambda: not Job.objects.filter(owner=alice, state__in=("queued", "running")).exists(), 60, "its jobs")
