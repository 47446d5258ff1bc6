"""The report's figures as static SVG, drawn with matplotlib's Agg/SVG backend (no display, no pyplot state).

The same SVG goes into the HTML page and the PDF. Figures are deterministic: the same data gives the same bytes
(``svg.hashsalt`` fixes the ids matplotlib derives from hashes, and the ``Date`` metadata is left out), which
keeps "the same job gives the same report, but for a timestamp" true. Text stays text (``svg.fonttype: none``):
smaller files, selectable and searchable in the PDF.

Each function takes plain data (lists and dicts from the report document) and returns an ``<svg>`` element as a
string, ready to be inlined (the XML prolog is dropped).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")  # before anything draws: never a display

from matplotlib import colors as mcolors
from matplotlib.figure import Figure

# The platform's colours (frontend/src/style.css), so that the figures look like the pages around them.
INK = "#1c2430"
MUTED = "#667085"
GRID = "#e3e7ee"
ACCENT = "#3b5bdb"
SECOND = "#f08c00"
ANOMALY = "#c92a2a"
SERIES_COLOURS = (ACCENT, SECOND, "#2b8a3e", "#7048e8", "#0b7285", "#c2255c")

RC: dict[str, Any] = {
    "svg.hashsalt": "moe-builder-report",
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.edgecolor": MUTED,
    "axes.labelcolor": INK,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.grid": True,
    "grid.color": GRID,
    "grid.linewidth": 0.8,
    "xtick.color": MUTED,
    "ytick.color": MUTED,
    "legend.frameon": False,
    "path.simplify": True,
    # Labels come from datasets: a "$" in one must stay a dollar sign, never start mathtext (or fail to parse).
    "text.parse_math": False,
}
WIDTH_IN = 6.6  # fits the PDF's text width (A4 less 2 × 18 mm) at 100 %


_ID = re.compile(r'\bid="([^"]+)"')
_REFERENCE = re.compile(r'(url\(#|href="#)([^")]+)')


def _svg(fig: Figure, name: str) -> str:
    """The figure as an inline ``<svg>`` whose ids all start with ``name-``: matplotlib numbers its ids per figure
    (``figure_1``, ``patch_1``...), and several figures in one page must not share an id."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight", pad_inches=0.05)
    text = buffer.getvalue()
    text = text[text.index("<svg") :].strip()
    text = _ID.sub(lambda m: f'id="{name}-{m.group(1)}"', text)
    return _REFERENCE.sub(lambda m: f"{m.group(1)}{name}-{m.group(2)}", text)


def _style(grid: bool = True) -> Any:
    """The report's matplotlib settings for the ``with`` block (heatmaps go without a grid)."""
    return matplotlib.rc_context(cast(Any, {**RC, "axes.grid": grid}))


def _figure(height_in: float, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(WIDTH_IN, height_in), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_axisbelow(True)
    return fig, axes


def training_curves(series: Mapping[str, Mapping[str, Sequence[float]]], markers: Sequence[Mapping[str, Any]]) -> str:
    """Loss (training and validation) and learning rate against the step.

    ``series``: ``{name: {"step": [...], "value": [...]}}`` (``loss``, ``val_loss``, ``mtp_loss`` (multi-token
    prediction), ``lr`` are drawn when present). ``markers``: ``[{"step", "kind"}]`` events drawn as dashed
    lines (interventions amber, anomalies and rollbacks red), as on the live dashboard.
    """
    with _style():
        fig, (loss_ax, lr_ax) = _figure(2.6, ncols=2)
        fig.get_layout_engine().set(wspace=0.08)  # type: ignore[union-attr, call-arg]
        drawn = False
        curves = (("loss", "training", ACCENT), ("val_loss", "validation", SECOND), ("mtp_loss", "MTP", "#7048e8"))
        for name, label, colour in curves:
            data = series.get(name)
            if data and data.get("step"):
                style = {"marker": "o", "markersize": 3} if name == "val_loss" else {}
                loss_ax.plot(data["step"], data["value"], color=colour, linewidth=1.4, label=label, **style)
                drawn = True
        loss_ax.set_title("Loss")
        loss_ax.set_xlabel("step")
        if drawn:
            values = [v for n, _, _ in curves for v in (series.get(n) or {}).get("value", []) if v is not None]
            if values and min(values) > 0 and max(values) / min(values) > 20:
                loss_ax.set_yscale("log")
            loss_ax.legend(loc="upper right")
        else:
            _no_data(loss_ax)
        for marker in markers:
            colour = SECOND if marker.get("kind") == "intervention" else ANOMALY
            loss_ax.axvline(marker["step"], color=colour, linestyle="--", linewidth=0.9)
        lr = series.get("lr")
        if lr and lr.get("step"):
            lr_ax.plot(lr["step"], lr["value"], color="#2b8a3e", linewidth=1.4)
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        else:
            _no_data(lr_ax)
        lr_ax.set_title("Learning rate")
        lr_ax.set_xlabel("step")
        return _svg(fig, "training")


def routing_heatmap(load: Sequence[Sequence[float]], layers: Sequence[int | str]) -> str:
    """Share of routed assignments per (layer, expert): one row per MoE layer, one column per expert.

    Colours are relative to the uniform share ``1 / experts`` (white = uniform, blue = busier, red = idler)
    so that dead and overloaded experts stand out whatever the number of experts. Values are written in the
    cells when there are few enough to read.
    """
    with _style(grid=False):
        rows, cols = len(load), len(load[0]) if load else 0
        fig, (ax,) = _figure(max(1.4, 0.38 * rows + 0.9))
        if not rows or not cols:
            _no_data(ax)
            return _svg(fig, "routing")
        uniform = 1.0 / cols
        norm = mcolors.TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(2 * uniform, max(map(max, load))))
        image = ax.imshow(load, cmap="RdBu", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(cols), [str(e) for e in range(cols)] if cols <= 32 else [""] * cols)
        ax.set_yticks(range(rows), [f"layer {layer}" for layer in layers])
        ax.set_xlabel("expert")
        ax.tick_params(length=0)
        if rows * cols <= 96:
            for r, row in enumerate(load):
                for c, value in enumerate(row):
                    dark = abs(value - uniform) > 0.6 * uniform
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else INK)
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        bar.set_label("share of assignments", color=MUTED)
        bar.ax.axhline(uniform, color=INK, linewidth=0.8)
        return _svg(fig, "routing")


def latency_bars(rows: Sequence[Mapping[str, Any]]) -> str:
    """Milliseconds per forward pass of each backend, one bar per batch size (shorter is faster).

    ``rows``: ``[{"backend", "batch", "ms"}]``; a row with ``ms`` None (a backend that could not run) is left out.
    """
    with _style():
        backends = list(dict.fromkeys(str(r["backend"]) for r in rows if r.get("ms") is not None))
        batches = sorted({int(r["batch"]) for r in rows if r.get("ms") is not None})
        fig, (ax,) = _figure(max(1.6, 0.3 * len(backends) * max(1, len(batches)) + 0.8))
        if not backends:
            _no_data(ax)
            return _svg(fig, "latency")
        height = 0.8 / len(batches)
        by_key = {(str(r["backend"]), int(r["batch"])): float(r["ms"]) for r in rows if r.get("ms") is not None}
        for i, batch in enumerate(batches):
            ys = [b + (i - (len(batches) - 1) / 2) * height for b in range(len(backends))]
            values = [by_key.get((backend, batch), math.nan) for backend in backends]
            bars = ax.barh(ys, values, height=height * 0.92, color=SERIES_COLOURS[i % len(SERIES_COLOURS)])
            bars.set_label(f"batch {batch}")
            ax.bar_label(bars, labels=[_ms(v) for v in values], padding=3, fontsize=7, color=INK)
        ax.set_yticks(range(len(backends)), backends)
        ax.invert_yaxis()
        ax.set_xlabel("milliseconds per forward pass")
        ax.margins(x=0.18)
        ax.grid(axis="y", visible=False)
        ax.legend(loc="lower right")
        return _svg(fig, "latency")


def confusion_matrix(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """Counts of (true label, predicted label) on the held-out examples; the diagonal is correct."""
    with _style(grid=False):
        n = len(labels)
        fig, (ax,) = _figure(min(6.5, max(2.2, 0.42 * n + 1.2)))
        if not n:
            _no_data(ax)
            return _svg(fig, "confusion")
        peak = max((max(row) for row in matrix if row), default=0) or 1
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=peak, aspect="equal", interpolation="nearest")
        names = [_short(label) for label in labels]
        ax.set_xticks(range(n), names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
        ax.set_yticks(range(n), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.tick_params(length=0)
        if n <= 20:
            for r, row in enumerate(matrix):
                for c, count in enumerate(row):
                    ax.text(c, r, str(count), ha="center", va="center", fontsize=7,
                            color="white" if count > 0.6 * peak else INK)  # fmt: skip
        return _svg(fig, "confusion")


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", color=MUTED, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _ms(value: float) -> str:
    if math.isnan(value):
        return ""
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _short(label: str, limit: int = 14) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"
