"""A person launches a saved configuration, watches the job live in Chromium, cancels it, and overlays two runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db.models import Min

from builder.configs.models import Config, ConfigVersion
from builder.datasets.models import Dataset
from builder.jobs.models import Job, MetricPoint
from tests.builder.test_jobs import CORPUS, tiny_spec
from tests.conftest import sign_in
from tests.services import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def loss_points(page: Any) -> int:
    return int(page.locator("[data-job-dashboard]").get_attribute("data-loss-points") or 0)


def saved_config(owner: Any, name: str, max_steps: int) -> ConfigVersion:
    config = Config.objects.create(owner=owner, name=name)
    return ConfigVersion.objects.create(config=config, number=1, spec=tiny_spec(max_steps))


def test_launch_watch_cancel_and_overlay(stack: Stack, page: Any, alice: Any, artifacts: Path) -> None:
    name = default_storage.save("datasets/e2e/corpus.txt", ContentFile(CORPUS.encode()))
    dataset = Dataset.objects.create(
        owner=alice, name="Tiny routing corpus", format="txt", file_name=name, state="ready"
    )
    # Long enough to still be running when cancelled; tokens per step small so that steps come quickly.
    version = saved_config(alice, "Tiny MoE", max_steps=100000)
    short = saved_config(alice, "Tiny MoE, short", max_steps=40)
    sign_in(page, stack.base_url, alice)

    # Launch from the comparison of the saved configurations, on alice's dataset.
    page.goto(f"{stack.base_url}/configure/compare/?c=config:{version.config_id}&c=config:{short.config_id}")
    column = page.locator(f"form.job-quick-launch:has(input[name=config_version][value='{version.pk}'])")
    column.locator("[data-testid=launch-dataset]").select_option(str(dataset.pk))
    page.screenshot(path=str(artifacts / "configs-compare-launch.png"), full_page=True)
    column.locator("[data-testid=launch]").click()
    page.wait_for_url("**/jobs/*/")
    job = Job.objects.get(owner=alice, config_version=version)
    assert page.url.endswith(f"/jobs/{job.pk}/")

    # The loss chart gains points while we watch, drawn by uPlot.
    page.wait_for_function("() => Number(document.querySelector('[data-job-dashboard]').dataset.lossPoints) >= 5")
    first = loss_points(page)
    page.wait_for_function(
        f"() => Number(document.querySelector('[data-job-dashboard]').dataset.lossPoints) >= {first + 20}",
        timeout=30000,
    )
    assert page.locator("[data-chart=loss] canvas").count() == 1
    assert page.locator("[data-chart=loss] .u-legend").inner_text().count("validation") == 1
    assert page.locator("[data-job-state]").first.inner_text().lower() == "running"
    assert "training" in page.locator("[data-field=phase]").inner_text()

    # The heatmap renders every (layer, expert) cell, in colour.
    page.wait_for_function("() => Number(document.querySelector('[data-heatmap]').dataset.rendered) === 8")
    coloured = page.evaluate(
        """() => {
          const c = document.querySelector('[data-heatmap]');
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          let n = 0;
          for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && (d[i] !== d[i + 1] || d[i + 1] !== d[i + 2])) n++;
          return n;
        }"""
    )
    assert coloured > 500
    assert page.locator("[data-events] li[data-kind=data_ready]").count() == 1
    assert "step" in page.locator("[data-log]").inner_text()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(artifacts / "job-dashboard-running.png"), full_page=True)

    # Log scale and smoothing redraw the chart; a drag zooms and Reset zoom restores it.
    page.check("[data-chart-card=loss] [data-control=log]")
    page.locator("[data-chart-card=loss] [data-control=smoothing]").evaluate(
        "e => { e.value = '0.9'; e.dispatchEvent(new Event('input')); }"
    )
    assert page.locator("[data-chart-card=loss] [data-control=smoothing-value]").inner_text() == "0.90"
    box = page.locator("[data-chart=loss] .u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    page.click("[data-chart-card=loss] [data-control=reset-zoom]")

    # Cancel: the job stops (within a step or two; tests/builder/test_jobs.py measures it) and can be resumed.
    page.click("[data-action=cancel]")
    page.wait_for_function("() => document.querySelector('[data-job-dashboard]').dataset.state === 'cancelled'")
    assert page.locator("[data-action=resume]").is_visible()
    assert not page.locator("[data-action=cancel]").is_visible()
    cancelled = Job.objects.get(pk=job.pk)
    assert cancelled.state == "cancelled" and cancelled.last_checkpoint_step == cancelled.result["step"]
    assert "checkpoint at step" in page.locator("[data-field=phase]").inner_text()
    page.screenshot(path=str(artifacts / "job-dashboard-cancelled.png"), full_page=True)

    # A second, short run from the launch form; then the two runs' loss on one chart.
    page.goto(f"{stack.base_url}/jobs/new/?config_version={short.pk}")
    assert page.locator("#id_config_version").input_value() == str(short.pk)
    page.select_option("#id_dataset", str(dataset.pk))
    page.click("[data-testid=launch-form] button[type=submit]")
    page.wait_for_url("**/jobs/*/")
    page.wait_for_function(
        "() => document.querySelector('[data-job-dashboard]').dataset.state === 'succeeded'", timeout=120000
    )
    second = Job.objects.get(owner=alice, config_version=short)
    page.goto(f"{stack.base_url}/jobs/")
    assert page.locator("[data-job-row]").count() == 2
    page.screenshot(path=str(artifacts / "jobs-list.png"), full_page=True)
    page.check(f"[data-job-row='{job.pk}'] input[type=checkbox]")
    page.check(f"[data-job-row='{second.pk}'] input[type=checkbox]")
    page.click("#overlay-submit")
    page.wait_for_url("**/jobs/compare/**")
    legend = page.locator("[data-chart=overlay] .u-legend").inner_text()
    assert f"#{job.pk}" in legend and f"#{second.pk}" in legend
    assert int(page.locator("[data-chart=overlay]").get_attribute("data-points") or 0) >= 40
    page.screenshot(path=str(artifacts / "jobs-overlay.png"), full_page=True)


def test_the_dashboard_recovers_from_a_gap_and_a_reconnect(stack: Stack, page: Any, alice: Any) -> None:
    """Messages lost between the server and the page are fetched again; a dropped socket reconnects."""
    name = default_storage.save("datasets/e2e/gap.txt", ContentFile(CORPUS.encode()))
    dataset = Dataset.objects.create(owner=alice, name="gap", format="txt", file_name=name, state="ready")
    version = saved_config(alice, "Gap", max_steps=30)
    sign_in(page, stack.base_url, alice)
    page.goto(f"{stack.base_url}/jobs/new/?config_version={version.pk}")
    page.select_option("#id_dataset", str(dataset.pk))
    page.click("[data-testid=launch-form] button[type=submit]")
    page.wait_for_url("**/jobs/*/")
    page.wait_for_function(
        "() => document.querySelector('[data-job-dashboard]').dataset.state === 'succeeded'", timeout=120000
    )
    job = Job.objects.get(owner=alice, config_version=version)
    last_seq = f"() => Number(document.querySelector('[data-job-dashboard]').dataset.lastSeq) === {job.metric_seq}"
    page.wait_for_function(last_seq)
    # Forget the points after step 20 on the page, as if their batches had been lost, then let a later batch
    # arrive: the page sees that it does not follow the last one and asks for what it missed.
    after = MetricPoint.objects.filter(job=job, step__gt=20).aggregate(first=Min("seq"))["first"] - 1
    count = page.evaluate(
        """([after, seq]) => {
          const d = window.jobDashboard;
          for (const values of d.store.series.values()) {
            for (const step of [...values.keys()]) if (step > 20) values.delete(step);
          }
          d.store.cache.clear();
          d.lastSeq = after;
          d.handle({type: 'metrics', seq_from: seq + 1, seq_to: seq, points: []});
          return d.store.count('loss');
        }""",
        [after, job.metric_seq],
    )
    assert count == 20
    page.wait_for_function("() => window.jobDashboard.store.count('loss') === 30")
    # Close the socket from the page: it reconnects and gets the whole history again.
    started = time.monotonic()
    page.evaluate("() => window.jobDashboard.socket.close()")
    page.wait_for_function("() => document.querySelector('[data-field=live]').dataset.state === 'retry'")
    page.wait_for_function("() => document.querySelector('[data-field=live]').dataset.state === 'live'")
    assert time.monotonic() - started < 10
    assert page.evaluate("() => window.jobDashboard.store.count('loss')") == 30


def test_the_dashboard_plots_the_multi_token_prediction_loss(
    stack: Stack, page: Any, alice: Any, artifacts: Path
) -> None:
    """A run with one MTP module streams its mtp_loss; the dashboard draws it beside the next-token loss (a run
    without MTP has no such chart)."""
    name = default_storage.save("datasets/e2e/mtp.txt", ContentFile(CORPUS.encode()))
    dataset = Dataset.objects.create(owner=alice, name="mtp", format="txt", file_name=name, state="ready")
    spec = tiny_spec(12)
    spec["model"]["mtp_depth"] = 1
    config = Config.objects.create(owner=alice, name="Tiny MoE with MTP")
    version = ConfigVersion.objects.create(config=config, number=1, spec=spec)
    sign_in(page, stack.base_url, alice)
    page.goto(f"{stack.base_url}/jobs/new/?config_version={version.pk}")
    page.select_option("#id_dataset", str(dataset.pk))
    page.click("[data-testid=launch-form] button[type=submit]")
    page.wait_for_url("**/jobs/*/")
    page.wait_for_function(
        "() => document.querySelector('[data-job-dashboard]').dataset.state === 'succeeded'", timeout=120000
    )
    job = Job.objects.get(owner=alice, config_version=version)
    page.wait_for_function("() => window.jobDashboard.store.count('mtp_loss') === 12")
    stored = MetricPoint.objects.filter(job=job, name="mtp_loss").count()
    assert stored == 12
    chart = page.locator("[data-testid=mtp-loss-chart]")
    assert chart.locator("canvas").count() == 1 and chart.locator(".chart-empty").is_hidden()
    legend = chart.locator(".u-legend").inner_text()
    assert "MTP" in legend and "next token" in legend
    chart.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "jobs-dashboard-mtp-loss.png"), full_page=True)
    # A run without MTP modules shows no MTP chart.
    plain = saved_config(alice, "No MTP", max_steps=5)
    other = Job.objects.create(
        owner=alice, name="plain", config_version=plain, spec=plain.spec, state="succeeded", total_steps=5
    )
    page.goto(f"{stack.base_url}/jobs/{other.pk}/")
    page.wait_for_selector("[data-testid=loss-chart]")
    assert page.locator("[data-testid=mtp-loss-chart]").count() == 0


def test_a_finished_jobs_heatmap_and_alert_say_how_the_run_ended(
    stack: Stack, page: Any, alice: Any, artifacts: Path
) -> None:
    """Seen on a finished job's dashboard: the heatmap's caption said balancing "is still settling" and the alert
    promised it "until step 250" on a run that trains no more steps. A job cancelled at step 30 of 1000 (4 experts
    at the default aux-free speed 0.001 settle by step 250) with expert 3 of both layers idle over its last logged
    steps is told which experts it ended with idle."""
    version = saved_config(alice, "Tiny MoE, cancelled early", max_steps=1000)
    job = Job.objects.create(
        owner=alice, name="cancelled early", config_version=version, spec=version.spec, state="cancelled",
        total_steps=1000, step=30,
    )  # fmt: skip
    points = [(step, "loss", 5.0 - step / 100) for step in range(1, 31)]
    points += [
        (step, f"expert_load/L{layer}/E{expert}", 0.0 if expert == 3 else 1 / 3)
        for step in range(21, 31)
        for layer in (0, 1)
        for expert in range(4)
    ]
    MetricPoint.objects.bulk_create(
        MetricPoint(job=job, seq=seq, step=step, name=name, value=value)
        for seq, (step, name, value) in enumerate(points, start=1)
    )
    Job.objects.filter(pk=job.pk).update(metric_seq=len(points))
    sign_in(page, stack.base_url, alice)
    page.goto(f"{stack.base_url}/jobs/{job.pk}/")
    page.wait_for_function("() => Number(document.querySelector('[data-heatmap]').dataset.rendered) === 8")
    tip = page.locator("[data-heatmap-tip]").inner_text()
    assert "settling" not in tip
    assert tip.endswith(
        "the run ended with 2 experts idle at step 30, outlined amber: L0 E3, L1 E3 (aux-free balancing needs"
        " about 250 steps to even the load out)."
    )
    alert = page.locator("[data-alert=dead]").inner_text()
    assert alert.startswith("2 idle experts") and "until step" not in alert
    assert "the run ended with them idle at step 30, before aux-free balancing evened this out" in alert
    page.locator("[data-heatmap]").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "jobs-dashboard-finished-idle-experts.png"), full_page=True)
