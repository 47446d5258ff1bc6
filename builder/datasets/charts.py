"""Bar charts as inline SVG, drawn on the server: they need no script, print as they are, and scale with the page."""

from __future__ import annotations

import math
from collections.abc import Sequence

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 64


def _nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 × 10^k at or above ``value`` (a round top for the axis)."""
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    return next(m * exponent for m in (1, 2, 5, 10) if m * exponent >= value)


def _compact(value: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:g}"


def bar_chart(bars: Sequence[tuple[str, float]], *, label: str, y_label: str, css_class: str = "") -> SafeString:
    """An accessible SVG bar chart of ``(category, value)``; ``label`` is its accessible name."""
    if not bars:
        return mark_safe("")
    top = _nice_max(max(value for _, value in bars))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / len(bars)
    bar_w = max(1.0, slot * 0.8)
    # Tick labels are 14px (about 9 units a character): slanted when they would not fit side by side.
    rotate = len(bars) > 12 or max(len(name) for name, _ in bars) * 9 > slot
    ticks = format_html_join(
        "",
        '<line x1="{}" x2="{}" y1="{}" y2="{}" class="grid"/>'
        '<text x="{}" y="{}" class="tick" text-anchor="end">{}</text>',
        (
            (LEFT, WIDTH - RIGHT, y, y, LEFT - 6, y + 4, _compact(top * f))
            for f in (0, 0.25, 0.5, 0.75, 1)
            for y in [round(TOP + plot_h * (1 - f), 1)]
        ),
    )
    rects = []
    for i, (name, value) in enumerate(bars):
        h = plot_h * value / top
        x = LEFT + i * slot + (slot - bar_w) / 2
        cx = round(x + bar_w / 2, 1)
        label_y = TOP + plot_h + 14
        if rotate:
            text = format_html(
                '<text x="{}" y="{}" class="tick" text-anchor="end" transform="rotate(-40 {} {})">{}</text>',
                cx, label_y, cx, label_y, name,
            )  # fmt: skip
        else:
            text = format_html('<text x="{}" y="{}" class="tick" text-anchor="middle">{}</text>', cx, label_y, name)
        bar = format_html(
            '<g class="bar"><rect x="{}" y="{}" width="{}" height="{}"><title>{}: {}</title></rect>{}</g>',
            round(x, 1), round(TOP + plot_h - h, 1), round(bar_w, 1), round(h, 1), name, f"{value:,g}", text,
        )  # fmt: skip
        rects.append(bar)
    return format_html(
        '<svg class="chart {}" viewBox="0 0 {} {}" role="img" aria-label="{}" preserveAspectRatio="xMidYMid meet">'
        '{}<text x="14" y="{}" class="axis-label" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>'
        "{}</svg>",
        css_class, WIDTH, HEIGHT, label, ticks, TOP + plot_h / 2, TOP + plot_h / 2, y_label,
        mark_safe("".join(rects)),
    )  # fmt: skip
