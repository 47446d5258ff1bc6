// The sweep page (/sweeps/<id>/): a trials table, the objective over trials, parallel coordinates and parameter
// importances, kept current from the websocket (/ws/sweeps/<id>/, see builder/sweeps/consumers.py): every message
// is a whole ``snapshot`` of the sweep read from the database, so a missed message is mended by the next one.
// After a disconnect the page reconnects with backoff. "Stop" and "Save the best trial" POST to the API.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import "./sweeps.css";
import { csrfToken, wsUrl } from "./common.js";

const FINISHED = new Set(["complete", "pruned"]);

function fmt(v) {
  if (v == null || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : String(Number(v.toPrecision(4)));
}

function fmtValue(v) {
  return typeof v === "number" ? fmt(v) : JSON.stringify(v);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

// Where a parameter's value sits on its axis, 0..1: a log range on a log scale, choices evenly spaced.
function position(param, value) {
  if (param.kind === "choice") {
    const i = param.choices.findIndex((c) => c === value);
    return param.choices.length > 1 ? i / (param.choices.length - 1) : 0.5;
  }
  const [lo, hi, v] = param.log ? [Math.log(param.low), Math.log(param.high), Math.log(value)] : [param.low, param.high, value];
  return hi > lo ? (v - lo) / (hi - lo) : 0.5;
}

// Blue (best) to red (worst) by where the objective sits among the finished trials.
function colour(t) {
  const hue = 220 - 220 * Math.min(1, Math.max(0, t));
  return `hsl(${hue}, 70%, 45%)`;
}

class SweepPage {
  constructor(root) {
    this.root = root;
    this.config = JSON.parse(root.querySelector("#sweep-page-config").textContent);
    this.sweep = this.config.sweep;
    this.charts = {};
    this.retry = 500;
    root.querySelector("[data-action=stop]")?.addEventListener("click", () => this.post("stop", null));
    root.querySelector("[data-action=save-best]")?.addEventListener("click", () => this.saveBest());
    this.render(this.sweep);
    this.connect();
  }

  connect() {
    const live = this.root.querySelector("[data-field=live]");
    const socket = new WebSocket(wsUrl(this.config.ws));
    socket.onopen = () => { live.textContent = "live"; this.retry = 500; };
    socket.onmessage = (msg) => {
      const data = JSON.parse(msg.data);
      if (data.type === "snapshot") this.render(data.sweep);
      this.root.dispatchEvent(new CustomEvent("sweep:message", { detail: data }));
    };
    socket.onclose = (ev) => {
      live.textContent = "reconnecting…";
      if (ev.code === 4404 || ev.code === 4401) { live.textContent = "not available"; return; }
      setTimeout(() => this.connect(), this.retry);
      this.retry = Math.min(this.retry * 2, 10000);
    };
  }

  async post(action, body) {
    const error = this.root.querySelector("[data-action-error]");
    error.hidden = true;
    const response = await fetch(`${this.config.api}/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken(this.root) },
      body: body == null ? null : JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      error.textContent = data.detail || Object.values(data).flat().join("; ") || `HTTP ${response.status}`;
      error.hidden = false;
      return null;
    }
    if (action === "stop") this.render(data);
    return data;
  }

  async saveBest() {
    const best = this.sweep.best;
    if (!best) return;
    const values = Object.entries(best.params).map(([k, v]) => `${k}=${fmtValue(v)}`).join(", ");
    const note = `best trial ${best.number} of sweep "${this.sweep.name}": ${this.sweep.objective} ${fmt(best.objective)} (${values})`;
    const version = await this.post("save-best", { note: note.slice(0, 300) });
    if (version) {
      const saved = this.root.querySelector("[data-saved]");
      saved.textContent = `Saved as version ${version.number} of ${this.sweep.config_name?.replace(/ v\d+$/, "") || "the configuration"}: ${version.note}`;
      saved.hidden = false;
    }
  }

  render(sweep) {
    this.sweep = sweep;
    const field = (name) => this.root.querySelector(`[data-field=${name}]`);
    const state = field("state");
    state.textContent = sweep.state === "queued" || sweep.state === "ticking" || sweep.state === "waiting" ? "running" : sweep.state;
    state.className = `job-state s-${sweep.running ? "running" : sweep.state}`;
    field("progress").textContent = `${sweep.trials.length} / ${sweep.budget}`;
    field("active").textContent = sweep.active;
    field("pruned").textContent = sweep.counts.pruned || 0;
    field("best").textContent = sweep.best ? `${fmt(sweep.best.objective)} (trial ${sweep.best.number})` : "–";
    this.root.querySelector("[data-action=stop]").hidden = !sweep.running || sweep.stop_requested;
    this.root.querySelector("[data-action=save-best]").disabled = !sweep.best;
    this.renderTrials(sweep);
    this.renderObjective(sweep);
    this.renderParallel(sweep);
    this.renderImportances(sweep);
  }

  renderTrials(sweep) {
    const body = this.root.querySelector("[data-trials]");
    body.replaceChildren(...sweep.trials.map((t) => {
      const job = t.job
        ? el("a", { href: t.dashboard }, `#${t.job}`)
        : el("span", { class: "muted" }, "—");
      const progress = t.job && t.state === "running" ? el("div", { class: "small muted" }, `${t.job_state}, step ${t.step} / ${t.total_steps}`) : "";
      const best = sweep.best && sweep.best.number === t.number;
      return el(
        "tr", { "data-trial": t.number, class: best ? "best-trial" : "" },
        el("td", {}, t.number),
        el("td", {}, el("span", { class: `job-state s-${t.state}` }, t.state)),
        ...sweep.space.map((p) => el("td", { class: "num" }, fmtValue(t.params[p.path]))),
        el("td", { class: "num", title: t.state === "pruned" ? "where it was stopped" : "" },
          t.objective == null ? "–" : fmt(t.objective) + (t.state === "pruned" ? " ✂" : ""), best ? el("span", { class: "small" }, " ★") : ""),
        el("td", {}, job, progress),
        el("td", { class: "small" }, t.reason || ""),
      );
    }));
  }

  chart(name, opts, data) {
    const container = this.root.querySelector(`[data-chart=${name}]`);
    const width = Math.max(280, container.clientWidth || 600);
    this.charts[name]?.destroy();
    this.charts[name] = new uPlot({ width, ...opts }, data, container);
  }

  renderObjective(sweep) {
    const done = sweep.trials.filter((t) => FINISHED.has(t.state) && t.objective != null);
    const xs = sweep.trials.map((t) => t.number);
    const better = sweep.direction === "maximize" ? Math.max : Math.min;
    let best = null;
    const values = [];
    const pruned = [];
    const bests = [];
    for (const t of sweep.trials) {
      const v = t.state === "complete" ? t.objective : null;
      values.push(v);
      pruned.push(t.state === "pruned" ? t.objective : null);
      if (v != null) best = best == null ? v : better(best, v);
      bests.push(best);
    }
    this.chart("objective", {
      height: 220,
      legend: { show: true },
      scales: { x: { time: false } },
      axes: [{ label: "trial", incrs: [1, 2, 5, 10, 20, 50] }, { label: sweep.objective, size: 60 }],
      series: [
        { label: "trial" },
        { label: sweep.objective, stroke: "#1c7ed6", width: 0, points: { show: true, size: 9, fill: "#1c7ed6" } },
        { label: "pruned (where it stopped)", stroke: "#f08c00", width: 0, points: { show: true, size: 9, fill: "#fff" } },
        { label: "best so far", stroke: "#2b8a3e", width: 2, spanGaps: true },
      ],
    }, [xs, values, pruned, bests]);
    this.root.querySelector("[data-chart=objective]").dataset.points = String(done.length);
  }

  renderParallel(sweep) {
    const axes = [...sweep.space.map((p) => p.path.split(".").slice(-2).join(".")), sweep.objective];
    const finished = sweep.trials.filter((t) => t.state === "complete" && t.objective != null);
    const objs = finished.map((t) => t.objective);
    const [lo, hi] = [Math.min(...objs), Math.max(...objs)];
    const rank = (v) => (hi > lo ? (v - lo) / (hi - lo) : 0) * (sweep.direction === "maximize" ? -1 : 1) + (sweep.direction === "maximize" ? 1 : 0);
    const xs = axes.map((_, i) => i);
    const series = [{ label: "axis" }];
    const data = [xs];
    for (const t of finished) {
      const ys = sweep.space.map((p) => position(p, t.params[p.path]));
      ys.push(hi > lo ? (t.objective - lo) / (hi - lo) : 0.5);
      series.push({ label: `trial ${t.number}`, stroke: colour(rank(t.objective)), width: 2, points: { show: true, size: 5 } });
      data.push(ys);
    }
    this.chart("parallel", {
      height: 240,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: false, range: [-0.1, axes.length - 0.9] }, y: { range: [-0.05, 1.05] } },
      axes: [
        { splits: () => xs, values: (u, splits) => splits.map((i) => axes[i] ?? ""), grid: { stroke: "#adb5bd", width: 1 } },
        { show: false },
      ],
      series,
    }, data);
    this.root.querySelector("[data-chart=parallel]").dataset.lines = String(finished.length);
  }

  renderImportances(sweep) {
    const entries = Object.entries(sweep.importances || {});
    const note = this.root.querySelector("[data-field=importances-note]");
    note.textContent = entries.length ? entries.map(([k, v]) => `${k}: ${(v * 100).toFixed(0)}%`).join(" · ") : "Shown once a few trials have finished.";
    const bars = uPlot.paths.bars({ size: [0.6, 60] });
    this.chart("importances", {
      height: 200,
      legend: { show: false },
      scales: { x: { time: false, range: [-0.5, Math.max(entries.length, 1) - 0.5] }, y: { range: [0, 1] } },
      axes: [
        { splits: () => entries.map((_, i) => i), values: (u, splits) => splits.map((i) => entries[i]?.[0].split(".").pop() ?? "") },
        { values: (u, splits) => splits.map((v) => `${Math.round(v * 100)}%`) },
      ],
      series: [{}, { label: "importance", fill: "#4dabf7", stroke: "#1c7ed6", paths: bars, points: { show: false } }],
    }, [entries.map((_, i) => i), entries.map(([, v]) => v)]);
  }
}

export function startSweeps() {
  const root = document.querySelector("[data-sweep-page]");
  if (root) new SweepPage(root);
}
