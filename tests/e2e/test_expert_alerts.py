"""The dashboard's dead-expert judgement (``frontend/src/jobcharts.js``) in Chromium, on scripted expert loads.

The module is bundled on its own by the project's esbuild (as ``make frontend`` bundles the pages) and driven
through its exports: a store of ``expert_load/L*/E*`` points in, the alerts a person would see out.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

FRONTEND = Path(__file__).resolve().parents[2] / "frontend"

# ``count`` logged steps ending at step ``last`` of one MoE layer with 4 experts; expert 3 gets nothing, the others
# share the load. The run balances aux-free at ``speed``, so it settles by step ceil(1 / (4 * speed)).
ALERTS_AFTER = """({ count, last, speed }) => {
  const store = new jobcharts.MetricStore();
  for (let step = last - count + 1; step <= last; step++) {
    for (let e = 0; e < 4; e++) store.put(step, `expert_load/L0/E${e}`, e === 3 ? 0 : 1 / 3);
  }
  const matrix = jobcharts.expertMatrix(store);
  return { alerts: jobcharts.expertAlerts(matrix, { balancing: "aux_free", bias_update_speed: speed }),
           dead: matrix.cells.filter((c) => jobcharts.isDead(c, 1 / matrix.experts)).map((c) => c.expert) };
}"""


@pytest.fixture
def charts(page: Any, tmp_path: Path) -> Any:
    """A blank page with ``jobcharts.js`` loaded as the global ``jobcharts``."""
    esbuild = FRONTEND / "node_modules" / ".bin" / "esbuild"
    if not esbuild.exists():
        pytest.fail(f"{esbuild} is missing: run `make frontend` (npm ci in frontend/)")
    subprocess.run(
        [
            str(esbuild),
            "src/jobcharts.js",
            "--bundle",
            "--format=iife",
            "--global-name=jobcharts",
            f"--outdir={tmp_path}",
        ],
        cwd=FRONTEND,
        check=True,
        capture_output=True,
    )
    page.set_content("<!doctype html><html><body></body></html>")
    page.add_script_tag(path=str(tmp_path / "jobcharts.js"))
    return page


def test_a_new_run_is_not_told_of_dead_experts_before_a_full_window_of_steps(charts: Any) -> None:
    window = charts.evaluate("() => jobcharts.WINDOW")
    for count in (1, 2, window - 1):
        early = charts.evaluate(ALERTS_AFTER, {"count": count, "last": count, "speed": 0.001})
        assert early["dead"] == [] and early["alerts"] == [], count


def test_idle_experts_are_a_warning_while_balancing_settles_and_a_failure_after(charts: Any) -> None:
    """At 0.001 with 4 experts the bias needs 250 steps to move by one uniform share (0.25)."""
    window = charts.evaluate("() => jobcharts.WINDOW")
    for last, level in ((window, "warn"), (249, "warn"), (250, "fail"), (400, "fail")):
        judged = charts.evaluate(ALERTS_AFTER, {"count": window, "last": last, "speed": 0.001})
        assert judged["dead"] == [3], last
        [alert] = [a for a in judged["alerts"] if a["kind"] == "dead"]
        assert alert["level"] == level and "L0 E3" in alert["text"], last
        assert ("idle expert" in alert["text"]) == (level == "warn"), last
    # A faster bias settles sooner: 0.01 x 4 experts moves it by a uniform share in 25 steps.
    faster = charts.evaluate(ALERTS_AFTER, {"count": window, "last": 30, "speed": 0.01})
    assert [a["level"] for a in faster["alerts"] if a["kind"] == "dead"] == ["fail"]


# ``count`` logged steps ending at step ``last`` of one MoE layer of ``experts`` experts, of which ``idle`` (the
# highest-numbered) get nothing; alerts for a run of ``total`` steps (null: not known) that has ``ended`` or not.
IDLE_TAIL = """({ experts, idle, last, total, ended = false }) => {
  const store = new jobcharts.MetricStore();
  for (let step = last - jobcharts.WINDOW + 1; step <= last; step++) {
    for (let e = 0; e < experts; e++) {
      store.put(step, `expert_load/L0/E${e}`, e >= experts - idle ? 0 : 1 / (experts - idle));
    }
  }
  const moe = { balancing: "aux_free", bias_update_speed: 0.001 };
  return jobcharts.expertAlerts(jobcharts.expertMatrix(store), moe, total, ended).filter((a) => a.kind === "dead");
}"""


def test_an_alert_names_idle_experts_in_heatmap_order_and_counts_the_rest(charts: Any) -> None:
    """Seen on a 16-expert run: the store's names sort E10 before E4, and the list ended in "…." ."""
    [dead] = charts.evaluate(IDLE_TAIL, {"experts": 16, "idle": 10, "last": 20, "total": None})
    named = ", ".join(f"L0 E{e}" for e in range(6, 14))
    assert dead["text"].startswith("10 idle experts (under 10% of the uniform share over the last 10 logged steps): ")
    assert f"steps): {named} and 2 more. Early in a run" in dead["text"]


def test_a_run_shorter_than_balancing_needs_is_not_promised_a_step_it_never_reaches(charts: Any) -> None:
    """4 experts at 0.001 settle by step 250: a 30-step run (seen on a finished job's dashboard) is told that the
    bias cannot even the load out within it, and what to change; a longer run is told the step."""
    [short] = charts.evaluate(IDLE_TAIL, {"experts": 4, "idle": 1, "last": 30, "total": 30})
    assert short["level"] == "warn" and "until step" not in short["text"]
    assert "needs about 250 steps to even this out, more than this run's 30" in short["text"]
    assert "raise model.moe.bias_update_speed (now 0.001)" in short["text"]
    [long] = charts.evaluate(IDLE_TAIL, {"experts": 4, "idle": 1, "last": 30, "total": 1000})
    assert long["level"] == "warn" and "has until step 250 to even this out" in long["text"]


def test_a_finished_run_is_told_how_it_ended_not_what_balancing_may_still_do(charts: Any) -> None:
    """Seen on a cancelled job's dashboard: idle experts at its last step were promised "until step 250"."""
    [cancelled] = charts.evaluate(IDLE_TAIL, {"experts": 4, "idle": 1, "last": 30, "total": 1000, "ended": True})
    assert cancelled["level"] == "warn" and "L0 E3" in cancelled["text"]
    assert "until step" not in cancelled["text"] and "bias_update_speed" not in cancelled["text"]
    assert "the run ended with them idle at step 30, before aux-free balancing evened this out" in cancelled["text"]
    assert "(it needs about 250 steps)." in cancelled["text"]
    # A finished run that was shorter than balancing needs is still told what to raise for the next one.
    [short] = charts.evaluate(IDLE_TAIL, {"experts": 4, "idle": 1, "last": 30, "total": 30, "ended": True})
    assert "the run ended with them idle at step 30" in short["text"]
    assert "more than this run's 30: for a run this short raise model.moe.bias_update_speed" in short["text"]


HEATMAP = """async ({ last, ended = false }) => {
  document.body.innerHTML = '<div style="width: 600px"><canvas></canvas></div><p></p>';
  const store = new jobcharts.MetricStore();
  for (let step = last - jobcharts.WINDOW + 1; step <= last; step++) {
    for (let e = 0; e < 4; e++) store.put(step, `expert_load/L0/E${e}`, e === 3 ? 0 : 1 / 3);
  }
  const canvas = document.querySelector("canvas");
  const heatmap = new jobcharts.ExpertHeatmap(canvas, { tip: document.querySelector("p") });
  heatmap.draw(jobcharts.expertMatrix(store), { balancing: "aux_free", bias_update_speed: 0.001 }, ended);
  // The page redraws on resize with the matrix alone (seen: red outlines again on a finished job's dashboard).
  const drawn = heatmap.layout;
  canvas.parentElement.style.width = "500px";
  for (let i = 0; i < 50 && heatmap.layout === drawn; i++) await new Promise((r) => setTimeout(r, 20));
  const redrawn = heatmap.layout !== drawn;
  const { labelW, labelH, cellW, cellH } = heatmap.layout;
  const dpr = window.devicePixelRatio || 1;
  const [r, g, b] = canvas.getContext("2d").getImageData(
    Math.round((labelW + 3 * cellW + 2) * dpr), Math.round((labelH + cellH / 2) * dpr), 1, 1).data;
  const hex = (v) => v.toString(16).padStart(2, "0");
  return { outline: `#${hex(r)}${hex(g)}${hex(b)}`, tip: document.querySelector("p").textContent, redrawn,
           idle: jobcharts.IDLE_OUTLINE, dead: jobcharts.DEAD_OUTLINE };
}"""


def test_the_heatmap_outlines_idle_experts_amber_and_dead_ones_red(charts: Any) -> None:
    """Seen on a new run's dashboard: the amber alert said "idle" while the heatmap outlined the same experts in
    the red it keeps for dead ones."""
    idle = charts.evaluate(HEATMAP, {"last": 20})
    assert idle["redrawn"], "the resize did not redraw the heatmap"
    assert idle["outline"] == idle["idle"] and "amber outlines mark idle experts" in idle["tip"]
    dead = charts.evaluate(HEATMAP, {"last": 300})
    assert dead["outline"] == dead["dead"] and "red outlines mark dead experts" in dead["tip"]


def test_a_finished_runs_heatmap_says_which_experts_it_ended_with_idle(charts: Any) -> None:
    """Seen on a finished 30-step job's dashboard: the caption said balancing "is still settling"; the run trains
    no more steps, so it states which experts ended idle (also after a resize redraw, which passes no state)."""
    ended = charts.evaluate(HEATMAP, {"last": 30, "ended": True})
    assert ended["redrawn"] and ended["outline"] == ended["idle"]
    assert "settling" not in ended["tip"]
    assert ended["tip"].endswith(
        "the run ended with 1 expert idle at step 30, outlined amber: L0 E3 (aux-free balancing needs about 250"
        " steps to even the load out)."
    )
    # Dead experts read the same whether or not the run has ended.
    dead = charts.evaluate(HEATMAP, {"last": 300, "ended": True})
    assert dead["outline"] == dead["dead"] and "red outlines mark dead experts" in dead["tip"]
