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
