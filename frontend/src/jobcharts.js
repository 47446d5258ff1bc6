// Charts of the jobs pages: a metric store keyed by (name, step), uPlot line charts with zoom, log scale,
// smoothing, a min/max band and event markers, and the layers × experts utilisation heatmap.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

export const EXPERT_RE = /^expert_load\/L(\d+)\/E(\d+)$/;

// ---- Number formats --------------------------------------------------------------------------------------------

export function fmtNumber(v) {
  if (v == null || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  if (a >= 1000) return Math.round(v).toLocaleString("en-US");
  return Number(v.toPrecision(4)).toString();
}

export function fmtLr(v) {
  if (v == null || !Number.isFinite(v)) return "–";
  return v === 0 ? "0" : v.toExponential(2);
}

export function fmtDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (h) return `${h} h ${String(m).padStart(2, "0")} min`;
  if (m) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
  return `${s} s`;
}

// ---- The metric store ------------------------------------------------------------------------------------------

// One value per (name, step), like the database: a replayed step overwrites, so applying the same points twice
// (a resync overlapping the live stream) changes nothing. A downsampled history keeps its min/max envelope.
export class MetricStore {
  constructor() { this.reset(); }

  reset() {
    this.series = new Map(); // name -> Map(step -> value)
    this.envelope = new Map(); // name -> Map(step -> [min, max])
    this.cache = new Map(); // name -> {steps, values}
    this.version = 0;
  }

  loadHistory(series) {
    for (const [name, s] of Object.entries(series || {})) {
      const values = this._map(name);
      for (let i = 0; i < s.step.length; i++) values.set(s.step[i], s.value[i]);
      if (s.min && s.max) {
        const env = new Map();
        for (let i = 0; i < s.step.length; i++) env.set(s.step[i], [s.min[i], s.max[i]]);
        this.envelope.set(name, env);
      }
      this.cache.delete(name);
    }
    this.version++;
  }

  put(step, name, value) {
    this._map(name).set(step, value);
    this.cache.delete(name);
    this.version++;
  }

  // Drop every point after ``step`` (the run went back to a checkpoint and will emit those steps again).
  truncate(step) {
    for (const [name, values] of this.series) {
      for (const s of [...values.keys()]) if (s > step) values.delete(s);
      const env = this.envelope.get(name);
      if (env) for (const s of [...env.keys()]) if (s > step) env.delete(s);
      this.cache.delete(name);
    }
    this.version++;
  }

  _map(name) {
    let values = this.series.get(name);
    if (!values) { values = new Map(); this.series.set(name, values); }
    return values;
  }

  names() { return [...this.series.keys()]; }

  // {steps: [...], values: [...]} sorted by step (cached until the series changes).
  sorted(name) {
    let hit = this.cache.get(name);
    if (hit) return hit;
    const values = this.series.get(name);
    const steps = values ? [...values.keys()].sort((a, b) => a - b) : [];
    hit = { steps, values: steps.map((s) => values.get(s)) };
    this.cache.set(name, hit);
    return hit;
  }

  count(name) { return this.series.get(name)?.size || 0; }

  latest(name) {
    const { steps, values } = this.sorted(name);
    return steps.length ? { step: steps[steps.length - 1], value: values[values.length - 1] } : null;
  }

  envelopeAt(name, step) { return this.envelope.get(name)?.get(step) || null; }
}

// Exponential moving average with TensorBoard's debiasing (the first points are not pulled towards 0).
export function smooth(values, weight) {
  if (!weight) return values.slice();
  const out = new Array(values.length);
  let last = 0;
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v == null || !Number.isFinite(v)) { out[i] = null; continue; }
    last = last * weight + (1 - weight) * v;
    n++;
    out[i] = last / (1 - Math.pow(weight, n));
  }
  return out;
}

// Align several {steps, values} on the union of their steps (uPlot wants one x array, nulls where missing).
export function align(columns) {
  const all = new Set();
  for (const c of columns) for (const s of c.steps) all.add(s);
  const xs = [...all].sort((a, b) => a - b);
  const index = new Map(xs.map((s, i) => [s, i]));
  const ys = columns.map((c) => {
    const out = new Array(xs.length).fill(null);
    for (let i = 0; i < c.steps.length; i++) out[index.get(c.steps[i])] = c.values[i];
    return out;
  });
  return [xs, ...ys];
}

// ---- Line charts -----------------------------------------------------------------------------------------------

// The y axis is as wide as its longest label (a fixed width clips "381.5 MB" to "81.5 MB"); uPlot's own recipe.
function axisSize(u, values, axisIdx, cycleNum) {
  const axis = u.axes[axisIdx];
  if (cycleNum > 1) return axis._size; // uPlot re-measures until the layout settles: stop after one pass
  let size = axis.ticks.size + axis.gap;
  const longest = (values || []).reduce((acc, v) => (String(v).length > acc.length ? String(v) : acc), "");
  if (longest) {
    u.ctx.font = axis.font[0];
    size += u.ctx.measureText(longest).width / devicePixelRatio;
  }
  return Math.ceil(size) + 4;
}

// Memory ticks at round binary sizes: 1, 2, 5 × KB/MB/GB steps.
export const BYTE_INCREMENTS = [1, 2, 3].flatMap((k) => [1, 2, 5, 10, 20, 50, 100, 200, 500].map((m) => m * 1024 ** k));

// Steps are integers: tick spacings of 1, 2, 5 × powers of ten (uPlot's defaults include fractions).
const STEP_INCREMENTS = Array.from({ length: 9 }, (_, e) => [1, 2, 5].map((m) => m * 10 ** e)).flat();

export const COLORS = ["#3b5bdb", "#e8590c", "#2b8a3e", "#7048e8", "#0c8599", "#c2255c", "#5c940d", "#862e9c"];

// A uPlot chart that rebuilds itself when the scale type changes, keeps the user's zoom across live updates,
// resizes with its container, and shows a note while it has no data.
//
// ``build()`` returns {series: [{label, stroke, width, dash, points, spanGaps, show}], data: [xs, ...ys],
// bands: [[upperIndex, lowerIndex, fill]]} from the current state; ``format`` formats y values.
export class LineChart {
  constructor(container, {
    build, format = fmtNumber, height = 220, markers = null, empty = "No data yet", zeroBased = false, yIncrements,
  }) {
    this.container = container;
    this.yIncrements = yIncrements; // tick spacings of the y axis (uPlot's decimal ones by default)
    this.zeroBased = zeroBased; // the y axis starts at 0 (memory, throughput: sizes, not trends)
    this.build = build;
    this.format = format;
    this.height = height;
    this.markers = markers; // () => [{step, color}]
    this.log = false;
    this.zoomed = false;
    this.plot = null;
    this.signature = "";
    this.emptyNote = document.createElement("p");
    this.emptyNote.className = "chart-empty muted";
    this.emptyNote.textContent = empty;
    container.append(this.emptyNote);
    new ResizeObserver(() => this._resize()).observe(container);
  }

  setLog(on) { this.log = on; this.signature = ""; this.update(); }

  resetZoom() {
    this.zoomed = false;
    if (this.plot) this._setData(this.plot.data, true);
  }

  update() {
    const spec = this.build();
    const n = spec.data[0].length;
    this.emptyNote.hidden = n > 0;
    if (this.log) {
      // Log scales cannot show 0 or negative values: leave those out rather than break the axis.
      spec.data = spec.data.map((col, i) => (i === 0 ? col : col.map((v) => (v != null && v > 0 ? v : null))));
    }
    const signature = JSON.stringify([this.log, spec.series.map((s) => [s.label, s.show !== false]), spec.bands]);
    if (!this.plot || signature !== this.signature) {
      this._create(spec);
      this.signature = signature;
    } else {
      this._setData(spec.data, !this.zoomed);
    }
    this.container.dataset.points = String(n);
  }

  _setData(data, resetScales) {
    this.plot.setData(data, resetScales);
  }

  _width() { return Math.max(240, this.container.clientWidth - 4); }

  _resize() {
    if (this.plot && Math.abs(this.plot.width - this._width()) > 2) this.plot.setSize({ width: this._width(), height: this.height });
  }

  _create(spec) {
    const previous = this.plot;
    const xScale = previous && this.zoomed ? { ...previous.scales.x } : null;
    const fmt = this.format;
    const opts = {
      width: this._width(),
      height: this.height,
      scales: {
        x: { time: false },
        y: this.log ? { distr: 3 } : this.zeroBased ? { range: (u, min, max) => [0, max > 0 ? max * 1.08 : 1] } : {},
      },
      axes: [
        { stroke: "#667085", grid: { stroke: "#eef1f6" }, ticks: { stroke: "#e3e7ee" }, incrs: STEP_INCREMENTS },
        { stroke: "#667085", grid: { stroke: "#eef1f6" }, ticks: { stroke: "#e3e7ee" }, incrs: this.yIncrements,
          values: (u, vals) => vals.map((v) => fmt(v)), size: axisSize },
      ],
      series: [
        { label: "step", value: (u, v) => (v == null ? "–" : String(v)) },
        ...spec.series.map((s) => ({
          label: s.label,
          stroke: s.stroke,
          width: s.width ?? 1.6,
          dash: s.dash,
          fill: s.fill,
          show: s.show !== false,
          spanGaps: s.spanGaps ?? true,
          points: s.points ?? { show: false },
          value: (u, v) => fmt(v),
        })),
      ],
      bands: (spec.bands || []).map(([upper, lower, fill]) => ({ series: [upper, lower], fill })),
      cursor: { drag: { x: true, y: false, setScale: true }, points: { size: 6 } },
      legend: { live: true },
      hooks: {
        // A drag across the plot selects a range, which uPlot then zooms to: from here on live updates keep the
        // user's range (only "Reset zoom" or a double-click go back to the whole run).
        setSelect: [(u) => { if (u.select.width > 0) this.zoomed = true; }],
        draw: [(u) => this._drawMarkers(u)],
      },
    };
    if (previous) previous.destroy();
    this.plot = new uPlot(opts, spec.data, this.container);
    if (xScale && xScale.min != null) this.plot.setScale("x", { min: xScale.min, max: xScale.max });
    // uPlot resets the zoom on double-click; keep our flag in step with it.
    this.plot.over.addEventListener("dblclick", () => { setTimeout(() => { this.zoomed = false; }, 0); });
  }

  _drawMarkers(u) {
    if (!this.markers) return;
    const { ctx } = u;
    const { left, top, width, height } = u.bbox;
    ctx.save();
    ctx.lineWidth = 1.5 * devicePixelRatio;
    ctx.setLineDash([5 * devicePixelRatio, 4 * devicePixelRatio]);
    for (const m of this.markers()) {
      const x = Math.round(u.valToPos(m.step, "x", true));
      if (x < left || x > left + width) continue;
      ctx.strokeStyle = m.color;
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
    }
    ctx.restore();
  }
}

// ---- The expert heatmap -----------------------------------------------------------------------------------------

// Viridis-like stops: low load is dark purple, the uniform share sits mid-scale, twice uniform and above is yellow.
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function colorAt(t) {
  const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  const c = STOPS[i].map((v, k) => Math.round(v + (STOPS[i + 1][k] - v) * f));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

export const DEAD_SHARE = 0.1; // an expert under 10% of the uniform share is dead
export const IMBALANCE_RATIO = 2.0; // the busiest expert over 2× the uniform share is an imbalance
export const WINDOW = 10; // logged steps averaged

// The mean load of each (layer, expert) over the last WINDOW logged steps, from the store's expert_load/* series;
// `points` is how many logged steps that mean covers (fewer than WINDOW at the start of a run).
export function expertMatrix(store) {
  const cells = [];
  let layers = new Set();
  let experts = 0;
  let step = 0;
  for (const name of store.names()) {
    const m = EXPERT_RE.exec(name);
    if (!m) continue;
    const { steps, values } = store.sorted(name);
    if (!steps.length) continue;
    const recent = values.slice(-WINDOW);
    const load = recent.reduce((a, b) => a + b, 0) / recent.length;
    cells.push({ layer: Number(m[1]), expert: Number(m[2]), load, points: recent.length });
    layers.add(Number(m[1]));
    experts = Math.max(experts, Number(m[2]) + 1);
    step = Math.max(step, steps[steps.length - 1]);
  }
  layers = [...layers].sort((a, b) => a - b);
  return { cells, layers, experts, step };
}

// Dead experts and imbalanced layers in a matrix, as sentences for people.
// What to change about dead experts, given the run's balancing (model.moe.* of its spec, when the page knows it).
function deadExpertAdvice(moe) {
  const balancing = moe && moe.balancing;
  if (balancing === "aux_free") {
    return `Balancing is aux-free: raise model.moe.bias_update_speed (now ${moe.bias_update_speed}) or the router temperature; early in a run the bias often evens this out by itself.`;
  }
  if (balancing === "aux_loss") {
    return `Balancing is an auxiliary loss: raise model.moe.aux_loss_coef (now ${moe.aux_loss_coef}) or switch to aux-free balancing.`;
  }
  if (balancing === "none") return "Balancing is off: turn it on (model.moe.balancing: aux_free).";
  return "Consider aux-free balancing, a higher bias update speed or a higher router temperature.";
}

// A cell is judged dead only over a full window: in the first logged steps of a run a mean of one or two
// routing decisions says nothing yet (a new run's router has not been trained, nor its balancing bias moved).
export function isDead(cell, uniform) {
  return cell.points >= WINDOW && cell.load < DEAD_SHARE * uniform;
}

// Steps aux-free balancing needs before idle experts are its failure: the bias moves bias_update_speed a step,
// so this many steps move it by one uniform share of the scores (125 at 8 experts and 0.001). Before then a run
// is still settling: early on, every token's hidden state points the same way (the first thing a model learns
// is the common next-token distribution: the tiny demo's router inputs go from a mean cosine similarity of
// 0.02 to 0.95 in 25 steps), so all tokens choose the same experts until their representations differ again.
export function balancingSettleSteps(moe, experts) {
  if (!moe || moe.balancing !== "aux_free" || !(moe.bias_update_speed > 0)) return 0;
  return Math.ceil(1 / (experts * moe.bias_update_speed));
}

// Whether experts under the dead share are still only idle at the matrix's step: aux-free balancing has not had
// its settle steps yet (see balancingSettleSteps). The heatmap outlines them amber, the alert warns.
export function balancingSettling({ experts, step }, moe = null) {
  return step < balancingSettleSteps(moe, experts);
}

const LISTED = 8; // experts named in an alert; the rest are counted

// The experts under the dead share, by layer and then expert as the heatmap shows them (the store's names sort
// E10 before E2): their count and a list naming the first LISTED ("L0 E6, L0 E7 and 2 more").
function underShare(cells, experts) {
  const uniform = 1 / experts;
  const dead = cells.filter((c) => isDead(c, uniform)).sort((a, b) => a.layer - b.layer || a.expert - b.expert);
  const named = dead.slice(0, LISTED).map((c) => `L${c.layer} E${c.expert}`).join(", ");
  return { count: dead.length, list: dead.length > LISTED ? `${named} and ${dead.length - LISTED} more` : named };
}

// `totalSteps`: the run's max_steps, when the page knows it: a run shorter than balancing's settle steps is told
// so, instead of being promised a step it never reaches. `ended`: the job trains no more steps (common.js
// JOB_TERMINAL_STATES): idle experts are then what the run ended with, and nothing is promised of balancing.
export function expertAlerts({ cells, layers, experts, step }, moe = null, totalSteps = null, ended = false) {
  if (!experts) return [];
  const uniform = 1 / experts;
  const dead = underShare(cells, experts);
  const alerts = [];
  if (dead.count) {
    const settle = balancingSettleSteps(moe, experts);
    const early = step < settle;
    const why = "Early in a run tokens look alike and choose the same experts";
    const short = totalSteps && totalSteps < settle;
    let advice = deadExpertAdvice(moe);
    if (early && ended) {
      advice = `${why}; the run ended with them idle at step ${step}, before aux-free balancing evened this out (it needs about ${settle} steps${short ? `, more than this run's ${totalSteps}: for a run this short raise model.moe.bias_update_speed (now ${moe.bias_update_speed})` : ""}).`;
    } else if (early && short) {
      advice = `${why}; aux-free balancing needs about ${settle} steps to even this out, more than this run's ${totalSteps}: for a run this short raise model.moe.bias_update_speed (now ${moe.bias_update_speed}).`;
    } else if (early) {
      advice = `${why}; aux-free balancing has until step ${settle} to even this out before it counts as dead.`;
    }
    alerts.push({
      level: early ? "warn" : "fail",
      kind: "dead",
      text: `${dead.count} ${early ? "idle" : "dead"} expert${dead.count > 1 ? "s" : ""} (under ${DEAD_SHARE * 100}% of the uniform share over the last ${WINDOW} logged steps): ${dead.list}. ${advice}`,
    });
  }
  const worst = [];
  for (const layer of layers) {
    const row = cells.filter((c) => c.layer === layer);
    const max = Math.max(...row.map((c) => c.load));
    if (max > IMBALANCE_RATIO * uniform) worst.push({ layer, ratio: max / uniform });
  }
  if (worst.length) {
    worst.sort((a, b) => b.ratio - a.ratio);
    alerts.push({
      level: "warn",
      kind: "imbalance",
      text: `Load imbalance in ${worst.length} layer${worst.length > 1 ? "s" : ""}: the busiest expert takes ${worst[0].ratio.toFixed(1)}× the uniform share in L${worst[0].layer}${worst.length > 1 ? ` (also ${worst.slice(1, 4).map((w) => `L${w.layer}`).join(", ")})` : ""}.`,
    });
  }
  return alerts;
}

export const DEAD_OUTLINE = "#c92a2a"; // the fail alert's red
export const IDLE_OUTLINE = "#f08c00"; // the warn alert's amber (jobs.css .job-alert.warn)

export class ExpertHeatmap {
  constructor(canvas, { legend, tip, maxLabel }) {
    this.canvas = canvas;
    this.legend = legend;
    this.tip = tip;
    this.maxLabel = maxLabel;
    this.matrix = null;
    this.moe = null;
    this.layout = null;
    canvas.addEventListener("mousemove", (e) => this._hover(e));
    canvas.addEventListener("mouseleave", () => this._describe());
    new ResizeObserver(() => this.matrix && this.draw(this.matrix)).observe(canvas.parentElement);
    this._drawLegend();
  }

  _drawLegend() {
    if (!this.legend) return;
    const ctx = this.legend.getContext("2d");
    for (let x = 0; x < this.legend.width; x++) {
      ctx.fillStyle = colorAt(x / (this.legend.width - 1));
      ctx.fillRect(x, 0, 1, this.legend.height);
    }
  }

  // `moe`: the run's model.moe settings, for telling idle experts (amber, balancing still settling) from dead ones;
  // `ended`: the job trains no more steps (JOB_TERMINAL_STATES), so the caption says what the run ended with. Both
  // are kept for the redraws on resize, which pass only the matrix.
  draw(matrix, moe = this.moe, ended = this.ended) {
    this.matrix = matrix;
    this.moe = moe;
    this.ended = ended;
    this.settling = balancingSettling(matrix, moe);
    const { cells, layers, experts } = matrix;
    const canvas = this.canvas;
    if (!experts) { canvas.dataset.rendered = ""; return; }
    const dpr = window.devicePixelRatio || 1;
    const cssWidth = Math.max(260, canvas.parentElement.clientWidth - 4);
    const labelW = 44;
    const labelH = 20;
    const cellW = Math.max(6, Math.min(56, Math.floor((cssWidth - labelW) / experts)));
    const cellH = Math.max(14, Math.min(34, Math.floor(220 / Math.max(1, layers.length))));
    const width = labelW + cellW * experts;
    const height = labelH + cellH * layers.length;
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#667085";
    ctx.textBaseline = "middle";
    ctx.textAlign = "center";
    const every = Math.ceil(24 / cellW); // label every expert only when they are wide enough
    for (let e = 0; e < experts; e += every) ctx.fillText(`E${e}`, labelW + e * cellW + cellW / 2, labelH / 2);
    ctx.textAlign = "right";
    layers.forEach((layer, row) => ctx.fillText(`L${layer}`, labelW - 8, labelH + row * cellH + cellH / 2));
    const uniform = 1 / experts;
    const rowOf = new Map(layers.map((l, i) => [l, i]));
    for (const c of cells) {
      const x = labelW + c.expert * cellW;
      const y = labelH + rowOf.get(c.layer) * cellH;
      ctx.fillStyle = colorAt(c.load / (2 * uniform));
      ctx.fillRect(x + 1, y + 1, cellW - 2, cellH - 2);
      if (isDead(c, uniform)) {
        ctx.strokeStyle = this.settling ? IDLE_OUTLINE : DEAD_OUTLINE;
        ctx.lineWidth = 2;
        ctx.strokeRect(x + 2, y + 2, cellW - 4, cellH - 4);
      }
    }
    this.layout = { labelW, labelH, cellW, cellH };
    canvas.dataset.rendered = String(cells.length);
    if (this.maxLabel) this.maxLabel.textContent = `≥ 2× uniform (${(200 * uniform).toFixed(1)}%)`;
    this._describe();
  }

  _describe(cell) {
    if (!this.tip || !this.matrix) return;
    const { layers, experts, step } = this.matrix;
    if (cell) {
      const uniform = 1 / experts;
      this.tip.textContent = `Layer ${cell.layer} · expert ${cell.expert}: ${(cell.load * 100).toFixed(1)}% of the layer's routed assignments (${(cell.load / uniform).toFixed(2)}× uniform), mean of the last ${WINDOW} logged steps.`;
    } else {
      this.tip.textContent = `${layers.length} MoE layer${layers.length === 1 ? "" : "s"} × ${experts} routed experts at step ${step}; uniform share ${(100 / experts).toFixed(1)}%. Hover a cell for its load; ${this._outlines()}.`;
    }
  }

  // What the outlines mean. A finished run's caption states how it ended: balancing settles no further there.
  _outlines() {
    if (!this.settling) return "red outlines mark dead experts";
    if (!this.ended) return "amber outlines mark idle experts (balancing is still settling)";
    const { cells, experts, step } = this.matrix;
    const idle = underShare(cells, experts);
    const settle = `aux-free balancing needs about ${balancingSettleSteps(this.moe, experts)} steps to even the load out`;
    if (!idle.count) return `the run ended with no idle expert at step ${step} (${settle})`;
    return `the run ended with ${idle.count} expert${idle.count > 1 ? "s" : ""} idle at step ${step}, outlined amber: ${idle.list} (${settle})`;
  }

  _hover(event) {
    if (!this.layout || !this.matrix) return;
    const rect = this.canvas.getBoundingClientRect();
    const { labelW, labelH, cellW, cellH } = this.layout;
    const e = Math.floor((event.clientX - rect.left - labelW) / cellW);
    const row = Math.floor((event.clientY - rect.top - labelH) / cellH);
    const layer = this.matrix.layers[row];
    const cell = this.matrix.cells.find((c) => c.layer === layer && c.expert === e);
    this._describe(cell);
  }
}
