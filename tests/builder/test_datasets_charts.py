"""The server-drawn SVG charts: one bar per category, heights to scale, user text escaped."""

from __future__ import annotations

import re

from builder.datasets.charts import _nice_max, bar_chart


def test_bars_are_to_scale_and_labels_are_escaped() -> None:
    svg = str(bar_chart([("<script>x</script>", 50), ("b", 100), ("c", 0)], label="Labels", y_label="examples"))
    heights = [float(h) for h in re.findall(r'<rect x="[^"]+" y="[^"]+" width="[^"]+" height="([^"]+)"', svg)]
    assert len(heights) == 3 and heights[0] * 2 == heights[1] and heights[2] == 0
    assert "<script>" not in svg and "&lt;script&gt;x&lt;/script&gt;" in svg
    assert 'role="img"' in svg and 'aria-label="Labels"' in svg


def test_many_or_long_labels_are_slanted_and_no_bars_draw_nothing() -> None:
    long_names = str(bar_chart([(f"category-{i}", i + 1) for i in range(20)], label="x", y_label="y"))
    assert "rotate(-40" in long_names
    assert "rotate(-40" not in str(bar_chart([("a", 1), ("b", 2)], label="x", y_label="y"))
    assert str(bar_chart([], label="x", y_label="y")) == ""


def test_axis_tops_are_round() -> None:
    assert [_nice_max(v) for v in (0, 3, 7, 12, 999, 1001)] == [1.0, 5, 10, 20, 1000, 2000]
