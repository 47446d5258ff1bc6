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

# Logged steps 1..n of one MoE layer with 4 experts; expert 3 gets nothing, the others share the load.
ALERTS_AFTER = """(steps) => {
  const store = new jobcharts.MetricStore();
  for (let step = 1; step <= steps; step++) {
    for (let e = 0; e < 4; e++) store.put(step, `expert_load/L0/E${e}`, e === 3 ? 0 : 1 / 3);
  }
  const matrix = jobcharts.expertMatrix(store);
  return { alerts: jobcharts.expertAlerts(matrix, { balancing: "aux_free", bias_update_speed: 0.001 }),
           dead: matrix.cells.filter((c) => jobcharts.isDead(c, 1 / matrix.experts)).map((c) => c.expert),
           window: jobcharts.WINDOW };
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
    for steps in (1, 2, window - 1):
        early = charts.evaluate(ALERTS_AFTER, steps)
        assert early["dead"] == [] and [a["kind"] for a in early["alerts"]] == [], steps


def test_an_expert_without_load_over_a_full_window_is_dead(charts: Any) -> None:
    judged = charts.evaluate(ALERTS_AFTER, charts.evaluate("() => jobcharts.WINDOW") + 5)
    assert judged["dead"] == [3]
    dead = [a for a in judged["alerts"] if a["kind"] == "dead"]
    assert len(dead) == 1 and dead[0]["level"] == "fail" and "L0 E3" in dead[0]["text"]
