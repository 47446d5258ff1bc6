// The jobs pages: the live dashboard of one job, the overlay of several runs, and the list's live refresh.
//
// Dashboard protocol (/ws/jobs/<id>/, see builder/jobs/consumers.py): a ``history`` message first (every series,
// long ones downsampled with a min/max envelope, up to sequence number ``seq``; every event; the job's summary),
// then live ``metrics`` batches numbered ``seq_from..seq_to`` with no gap. A batch that does not start right after
// the last one means messages were lost: the page asks for the missing points (``resync`` over the socket, or
// GET /api/jobs/<id>/metrics?after= when the socket is down). Points are keyed by (name, step), so applying one
// twice is harmless. ``truncate`` drops the points after a step (the run went back to a checkpoint). After a
// disconnect the page reconnects with backoff and the server sends the whole history again.
//
// Every message received is re-dispatched as a ``job:message`` DOM event on the dashboard element with the time
// it arrived, so that tools (the latency benchmark) can observe the stream without patching the page.
import "./jobs.css";
import { JOB_TERMINAL_STATES, csrfToken, fmtBytes, wsUrl } from "./common.js";
import {
  BYTE_INCREMENTS, COLORS, ExpertHeatmap, LineChart, MetricStore, align, expertAlerts, expertMatrix,
  fmtDuration, fmtLr, fmtNumber, smooth,
} from "./jobcharts.js";

const ACTIVE = new Set(["queued", "running", "preempted"]);
const RESUMABLE = new Set(["failed", "cancelled", "preempted"]);
const RESYNC_LIMIT = 20000; // the consumer's page size: a full page means there may be more
const LOG_LINES = 200;
const HIGHLIGHT = { intervention: "#f08c00", anomaly: "#c92a2a", rollback: "#c92a2a" };
const LOG_METRICS = [
  ["loss", "loss", fmtNumber], ["val_loss", "val_loss", fmtNumber], ["lr", "lr", fmtLr],
  ["grad_norm", "grad_norm", fmtNumber], ["tokens_per_s", "tok/s", fmtNumber], ["memory_bytes", "mem", fmtBytes],
  ["mtp_loss", "mtp_loss", fmtNumber],
];

function describeEvent(ev) {
  const d = ev.data || {};
  switch (ev.kind) {
    case "state":
      return `${d.from || "new"} → ${d.to}${d.reason ? `: ${d.reason}` : ""}${d.worker ? ` (${d.worker}, attempt ${d.attempt})` : ""}`;
    case "checkpoint":
      return `checkpoint saved at step ${d.step}${d.seconds != null ? ` in ${Number(d.seconds).toFixed(2)} s` : ""}`;
    case "resume":
      return `resumed from the checkpoint of step ${d.step}`;
    case "intervention": {
      const changes = Object.entries(d.changes || {})
        .map(([k, v]) => `${k} ${fmtNumber(Number(v.before))} → ${fmtNumber(Number(v.after))}`).join(", ");
      return `plateau intervention${d.reason ? ` (${d.reason})` : ""}: ${changes || "no change"}`;
    }
    case "anomaly":
      return `anomaly: ${d.reason || d.kind || "loss spike"}${d.loss != null ? ` (loss ${d.loss})` : ""}${d.action ? `, ${d.action}` : ""}`;
    case "rollback":
      return `rolled back to step ${d.step}${d.reason ? `: ${d.reason}` : ""}`;
    case "early_stop":
      return `early stop${d.reason ? `: ${d.reason}` : ""}`;
    case "preparing":
      return "preparing the data (tokenizing)";
    case "compiling":
      return "compiling the model (torch.compile): the first step waits for it";
    case "compiled":
      return `model compiled in ${Number(d.seconds || 0).toFixed(1)} s (its first step included)`;
    case "data_ready":
      return `data ready in ${Number(d.seconds || 0).toFixed(1)} s: ${fmtNumber(d.train_tokens)} training and ${fmtNumber(d.val_tokens)} validation tokens, vocabulary ${d.vocab_size}`;
    case "cancel_requested":
      return "cancel requested: stopping after the current step";
    case "error":
      return `error: ${d.message}`;
    default:
      return `${ev.kind} ${JSON.stringify(d)}`;
  }
}

class Dashboard {
  constructor(root) {
    this.root = root;
    this.config = JSON.parse(document.getElementById("job-dashboard-config").textContent);
    this.job = this.config.job;
    this.moe = this.config.moe || null;
    this.store = new MetricStore();
    this.events = new Map(); // seq -> event
    this.log = []; // {step, order, text}
    this.lastSeq = 0;
    this.resyncPending = false;
    this.socket = null;
    this.delay = 1000;
    this.closedForGood = false;
    this.renderTimer = null;
    this.smoothing = 0.6;
    this.field = (name) => root.querySelector(`[data-field="${name}"]`);
    this._charts();
    this._controls();
    this.render();
    this.connect();
    // The queue position changes without any message about this job: refresh the summary while queued.
    setInterval(() => { if (this.job.state === "queued") this.refreshSummary(); }, 5000);
  }

  // ---- charts ----

  _charts() {
    const chart = (name) => this.root.querySelector(`[data-chart="${name}"]`);
    const markers = () => [...this.events.values()]
      .filter((e) => HIGHLIGHT[e.kind]).map((e) => ({ step: e.step, color: HIGHLIGHT[e.kind] }));
    this.loss = new LineChart(chart("loss"), {
      height: 280,
      markers,
      empty: "The loss appears with the first training step.",
      build: () => this._lossData(),
    });
    const simple = (name, label, color, format, zeroBased = false, yIncrements = undefined) => new LineChart(chart(name), {
      format,
      zeroBased,
      yIncrements,
      markers,
      build: () => ({ series: [{ label, stroke: color }], data: align([this.store.sorted(name)]) }),
    });
    this.others = [
      simple("grad_norm", "grad norm", COLORS[2], fmtNumber),
      simple("lr", "learning rate", COLORS[3], fmtLr),
      simple("tokens_per_s", "tokens/s", COLORS[5], fmtNumber, true),
      simple("memory_bytes", "memory", COLORS[4], fmtBytes, true, BYTE_INCREMENTS),
    ];
    // Multi-token prediction (only on the page of a job that has MTP modules): their loss beside the
    // next-token loss, both smoothed as the loss chart is, so the gap between predicting t+1 and t+2 shows.
    if (chart("mtp_loss")) {
      this.mtpChart = new LineChart(chart("mtp_loss"), {
        markers,
        empty: "The MTP loss appears with the first training step.",
        build: () => {
          const mtp = this.store.sorted("mtp_loss");
          const next = this.store.sorted("loss");
          return {
            series: [{ label: "MTP (t+2…)", stroke: COLORS[6], width: 2 }, { label: "next token", stroke: COLORS[0], width: 1.2 }],
            data: align([
              { steps: mtp.steps, values: smooth(mtp.values, this.smoothing) },
              { steps: next.steps, values: smooth(next.values, this.smoothing) },
            ]),
          };
        },
      });
      this.others.push(this.mtpChart);
    }
    this.heatmap = new ExpertHeatmap(this.root.querySelector("[data-heatmap]"), {
      legend: this.root.querySelector("[data-heatmap-legend]"),
      tip: this.root.querySelector("[data-heatmap-tip]"),
      maxLabel: this.field("heatmap-max"),
    });
  }

  _lossData() {
    const train = this.store.sorted("loss");
    const val = this.store.sorted("val_loss");
    const smoothed = { steps: train.steps, values: smooth(train.values, this.smoothing) };
    // The envelope of a downsampled history (absent for live points and short runs).
    const lo = { steps: [], values: [] };
    const hi = { steps: [], values: [] };
    for (const step of train.steps) {
      const env = this.store.envelopeAt("loss", step);
      if (env) { lo.steps.push(step); lo.values.push(env[0]); hi.steps.push(step); hi.values.push(env[1]); }
    }
    const hasBand = lo.steps.length > 0;
    const series = [
      { label: "train (raw)", stroke: this.smoothing ? "rgba(59, 91, 219, 0.28)" : COLORS[0], width: 1.2 },
      { label: `train (smoothed ${this.smoothing.toFixed(2)})`, stroke: COLORS[0], width: 2, show: this.smoothing > 0 },
      { label: "validation", stroke: COLORS[1], width: 2, points: { show: true, size: 5 } },
    ];
    const columns = [train, smoothed, val];
    const bands = [];
    if (hasBand) {
      series.push({ label: "train max", stroke: "rgba(59, 91, 219, 0.15)", width: 0.5 });
      series.push({ label: "train min", stroke: "rgba(59, 91, 219, 0.15)", width: 0.5 });
      columns.push(hi, lo);
      bands.push([4, 5, "rgba(59, 91, 219, 0.12)"]);
    }
    return { series, data: align(columns), bands };
  }

  _controls() {
    const card = this.root.querySelector('[data-chart-card="loss"]');
    card.querySelector('[data-control="log"]').addEventListener("change", (e) => this.loss.setLog(e.target.checked));
    const slider = card.querySelector('[data-control="smoothing"]');
    const out = card.querySelector('[data-control="smoothing-value"]');
    this.smoothing = Number(slider.value);
    slider.addEventListener("input", () => {
      this.smoothing = Number(slider.value);
      out.textContent = this.smoothing.toFixed(2);
      this.loss.update();
      this.mtpChart?.update();
    });
    card.querySelector('[data-control="reset-zoom"]').addEventListener("click", () => this.loss.resetZoom());
    for (const button of this.root.querySelectorAll("[data-action]")) {
      button.addEventListener("click", () => this.control(button.dataset.action, button));
    }
  }

  async control(action, button) {
    const error = this.root.querySelector("[data-action-error]");
    error.hidden = true;
    button.disabled = true;
    try {
      const response = await fetch(`${this.config.api}/${action}`, {
        method: "POST",
        headers: { "X-CSRFToken": csrfToken(this.root), Accept: "application/json" },
        credentials: "same-origin",
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        error.textContent = `${action}: ${body.detail || response.statusText}`;
        error.hidden = false;
      } else {
        this.job = { ...this.job, ...body };
        this.render();
      }
    } catch (exc) {
      error.textContent = `${action}: ${exc.message}`;
      error.hidden = false;
    } finally {
      button.disabled = false;
    }
  }

  async refreshSummary() {
    try {
      const response = await fetch(this.config.api, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (response.ok) { this.job = { ...this.job, ...(await response.json()) }; this.scheduleRender(); }
    } catch { /* the next state message or interval tries again */ }
  }

  // ---- the socket ----

  connect() {
    const socket = new WebSocket(wsUrl(this.config.ws));
    this.socket = socket;
    socket.addEventListener("open", () => { this.delay = 1000; this._live("live", "live"); });
    socket.addEventListener("message", (event) => {
      const receivedAt = Date.now();
      const message = JSON.parse(event.data);
      this.handle(message);
      this.root.dispatchEvent(new CustomEvent("job:message", { detail: { message, receivedAt } }));
    });
    socket.addEventListener("close", (event) => {
      if (this.socket !== socket) return;
      if (event.code === 4401 || event.code === 4404) {
        this.closedForGood = true;
        this._live("closed", event.code === 4401 ? "signed out" : "job not found");
        return;
      }
      const wait = this.delay * (0.8 + Math.random() * 0.4); // jitter, so many tabs do not reconnect at once
      this._live("retry", `reconnecting in ${Math.round(wait / 1000)} s`);
      setTimeout(() => this.connect(), wait);
      this.delay = Math.min(this.delay * 2, 30000);
    });
  }

  _live(state, text) {
    const el = this.field("live");
    el.dataset.state = state;
    el.textContent = text;
  }

  handle(message) {
    switch (message.type) {
      case "history":
        this.store.reset();
        this.store.loadHistory(message.series);
        this.lastSeq = message.seq;
        this.resyncPending = false;
        this.events.clear();
        for (const ev of message.events) this.events.set(ev.seq, ev);
        this.job = { ...this.job, ...message.job };
        this._rebuildLog();
        break;
      case "metrics":
        if (message.seq_from > this.lastSeq + 1) this.resync(this.lastSeq);
        this._apply(message.points);
        this.lastSeq = Math.max(this.lastSeq, message.seq_to);
        break;
      case "resync":
        this._apply(message.points);
        this.resyncPending = false;
        if (message.points.length >= RESYNC_LIMIT) this.resync(message.points[message.points.length - 1][0]);
        break;
      case "truncate":
        this.store.truncate(message.after_step);
        this.log = this.log.filter((l) => l.step <= message.after_step || l.order === 0);
        break;
      case "event":
        this.events.set(message.event.seq, message.event);
        this._logEvent(message.event);
        if (message.event.kind === "checkpoint") this.job.last_checkpoint_step = message.event.step;
        if (message.event.kind === "cancel_requested") this.job.cancel_requested = true;
        break;
      case "state":
        this.job.state = message.state;
        this.refreshSummary();
        break;
      case "live":
        // The server could not reach the message broker: it sends what the database records until it can.
        this._live(message.paused ? "paused" : "live", message.paused ? "live updates paused" : "live");
        if (message.paused) this.field("live").title = message.reason;
        else this.field("live").removeAttribute("title");
        break;
      case "error":
        console.warn("job socket:", message.field, message.message);
        break;
      default:
        return; // e.g. the benchmark's pings: nothing to draw
    }
    this.scheduleRender();
  }

  resync(after) {
    if (this.resyncPending) return;
    this.resyncPending = true;
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify({ type: "resync", after }));
    } else {
      this._fetchAfter(after);
    }
  }

  async _fetchAfter(after) {
    try {
      let cursor = after;
      for (;;) {
        const response = await fetch(`${this.config.api}/metrics?after=${cursor}&limit=10000`, { credentials: "same-origin" });
        if (!response.ok) break;
        const page = await response.json();
        this._apply(page.points);
        if (page.points.length < 10000) break;
        cursor = page.next_after;
      }
    } finally {
      this.resyncPending = false;
      this.scheduleRender();
    }
  }

  _apply(points) {
    const steps = new Map();
    for (const [, step, name, value] of points) {
      this.store.put(step, name, value);
      if (!steps.has(step)) steps.set(step, {});
      steps.get(step)[name] = value;
    }
    for (const [step, values] of [...steps.entries()].sort((a, b) => a[0] - b[0])) this._logMetrics(step, values);
  }

  // ---- the log tail ----

  _logMetrics(step, values) {
    const parts = LOG_METRICS.filter(([name]) => values[name] != null).map(([name, label, f]) => `${label} ${f(values[name])}`);
    if (!parts.length) return;
    this.log = this.log.filter((l) => !(l.step === step && l.order === 1));
    this.log.push({ step, order: 1, text: `step ${String(step).padStart(6)}  ${parts.join("  ")}` });
    this._trimLog();
  }

  _logEvent(ev) {
    this.log.push({ step: ev.step, order: 2, seq: ev.seq, text: `[${ev.kind}] step ${ev.step}: ${describeEvent(ev)}`, kind: ev.kind });
    this._trimLog();
  }

  _trimLog() {
    this.log.sort((a, b) => a.step - b.step || a.order - b.order || (a.seq || 0) - (b.seq || 0));
    if (this.log.length > LOG_LINES) this.log = this.log.slice(-LOG_LINES);
  }

  _rebuildLog() {
    this.log = [];
    const loss = this.store.sorted("loss");
    for (const step of loss.steps.slice(-60)) {
      const values = {};
      for (const [name] of LOG_METRICS) {
        const v = this.store.series.get(name)?.get(step);
        if (v != null) values[name] = v;
      }
      this._logMetrics(step, values);
    }
    for (const ev of this.events.values()) this._logEvent(ev);
  }

  // ---- rendering ----

  scheduleRender() {
    if (this.renderTimer) return;
    this.renderTimer = setTimeout(() => { this.renderTimer = null; this.render(); }, 150);
  }

  render() {
    this._renderHeader();
    this.loss.update();
    for (const c of this.others) c.update();
    const matrix = expertMatrix(this.store);
    const ended = JOB_TERMINAL_STATES.has(this.job.state);
    this.heatmap.draw(matrix, this.moe, ended);
    this.field("heatmap-step").textContent = matrix.experts ? `step ${matrix.step} · mean of the last 10 logged steps` : "";
    this._renderAlerts(expertAlerts(matrix, this.moe, this.job.total_steps || null, ended));
    this._renderEvents();
    this._renderLog();
    this.root.dataset.lossPoints = String(this.store.count("loss"));
    this.root.dataset.lastSeq = String(this.lastSeq);
    this.root.dataset.state = this.job.state;
  }

  _renderHeader() {
    const job = this.job;
    const badge = this.root.querySelector("h1 [data-job-state]");
    badge.textContent = job.state;
    badge.className = `job-state s-${job.state}`;
    const latest = this.store.latest("loss");
    const step = Math.max(job.step || 0, latest ? latest.step : 0);
    const total = job.total_steps || 0;
    const fraction = total ? Math.min(1, step / total) : 0;
    this.field("steps").textContent = `step ${step.toLocaleString("en-US")} / ${total.toLocaleString("en-US")}`;
    this.field("percent").textContent = `${(fraction * 100).toFixed(1)}%`;
    this.field("bar").style.width = `${(fraction * 100).toFixed(2)}%`;
    this.field("bar").parentElement.setAttribute("aria-valuenow", (fraction * 100).toFixed(0));
    this.field("bar").parentElement.dataset.state = job.state;
    const stepTime = this.store.latest("step_time_s");
    const eta = job.state === "running" && stepTime && total > step ? (total - step) * stepTime.value : null;
    this.field("eta").textContent = eta != null ? `ETA ${fmtDuration(eta)}` : "";
    const tps = this.store.latest("tokens_per_s");
    this.field("throughput").textContent = tps && job.state === "running" ? `${fmtNumber(tps.value)} tokens/s` : "";
    this.field("phase").textContent = this._phase();
    this.field("attempts").textContent = String(job.attempts ?? "");
    const error = this.field("error");
    error.textContent = job.error || "";
    error.hidden = !job.error;
    const cancel = this.root.querySelector('[data-action="cancel"]');
    const resume = this.root.querySelector('[data-action="resume"]');
    if (cancel) cancel.hidden = !(this.config.can_control && ACTIVE.has(job.state) && !job.cancel_requested);
    if (resume) resume.hidden = !(this.config.can_control && RESUMABLE.has(job.state));
  }

  _phase() {
    const job = this.job;
    if (job.state === "queued") return job.queue_position ? `Queued · position ${job.queue_position} on ${job.queue}` : "Queued";
    if (job.state === "running") {
      if (job.cancel_requested) return "Cancelling · stopping after this step";
      const kinds = [...this.events.values()].map((e) => e.kind);
      const lastPrep = kinds.lastIndexOf("preparing");
      if (lastPrep >= 0 && kinds.lastIndexOf("data_ready") < lastPrep) return "Running · preparing the data (tokenizing)";
      const lastCompile = kinds.lastIndexOf("compiling");
      if (lastCompile >= 0 && kinds.lastIndexOf("compiled") < lastCompile) return "Running · compiling the model";
      return "Running · training";
    }
    const names = { succeeded: "Succeeded", failed: "Failed", cancelled: "Cancelled", preempted: "Preempted · waiting for a worker" };
    const suffix = job.last_checkpoint_step != null && job.state !== "succeeded" ? ` · last checkpoint at step ${job.last_checkpoint_step}` : "";
    return (names[job.state] || job.state) + suffix;
  }

  _renderAlerts(alerts) {
    const box = this.root.querySelector("[data-alerts]");
    const html = alerts.map((a) => `<div class="job-alert ${a.level}" data-alert="${a.kind}">${a.text}</div>`).join("");
    if (box.innerHTML !== html) box.innerHTML = html;
  }

  _renderEvents() {
    const list = this.root.querySelector("[data-events]");
    const events = [...this.events.values()].sort((a, b) => b.seq - a.seq).slice(0, 150);
    const signature = events.map((e) => e.seq).join(",");
    if (list.dataset.signature === signature) return;
    list.dataset.signature = signature;
    list.replaceChildren(...events.map((ev) => {
      const li = document.createElement("li");
      li.className = `ev ev-${ev.kind}`;
      li.dataset.kind = ev.kind;
      const when = new Date(ev.at);
      li.innerHTML = `<span class="ev-kind"></span><span class="ev-step"></span><span class="ev-text"></span><time></time>`;
      li.querySelector(".ev-kind").textContent = ev.kind.replace("_", " ");
      li.querySelector(".ev-step").textContent = `step ${ev.step}`;
      li.querySelector(".ev-text").textContent = describeEvent(ev);
      const time = li.querySelector("time");
      time.dateTime = ev.at;
      time.textContent = when.toLocaleTimeString();
      return li;
    }));
  }

  _renderLog() {
    const pre = this.root.querySelector("[data-log]");
    const text = this.log.map((l) => l.text).join("\n");
    if (pre.textContent === text) return;
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
    pre.textContent = text;
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }
}

// ---- The overlay of several runs --------------------------------------------------------------------------------

function startOverlay(root) {
  const data = JSON.parse(document.getElementById("job-overlay-data").textContent);
  const format = data.metric === "lr" ? fmtLr : data.metric === "memory_bytes" ? fmtBytes : fmtNumber;
  let smoothing = 0;
  const chart = new LineChart(root.querySelector('[data-chart="overlay"]'), {
    height: 380,
    format,
    yIncrements: data.metric === "memory_bytes" ? BYTE_INCREMENTS : undefined,
    empty: `None of these runs has ${data.label.toLowerCase()} points yet.`,
    build: () => {
      const columns = data.runs.map((run) => {
        const steps = run.series ? run.series.step : [];
        const values = run.series ? run.series.value : [];
        return { steps, values: smooth(values, smoothing) };
      });
      return {
        series: data.runs.map((run, i) => ({ label: `${run.name} #${run.id}`, stroke: COLORS[i % COLORS.length], width: 1.8 })),
        data: align(columns),
      };
    },
  });
  root.querySelector('[data-control="log"]').addEventListener("change", (e) => chart.setLog(e.target.checked));
  const slider = root.querySelector('[data-control="smoothing"]');
  slider.addEventListener("input", () => {
    smoothing = Number(slider.value);
    root.querySelector('[data-control="smoothing-value"]').textContent = smoothing.toFixed(2);
    chart.update();
  });
  root.querySelector('[data-control="reset-zoom"]').addEventListener("click", () => chart.resetZoom());
  chart.update();
  for (const swatch of document.querySelectorAll("[data-swatch]")) {
    swatch.style.background = COLORS[Number(swatch.dataset.swatch) % COLORS.length];
  }
}

// ---- The list's live refresh ------------------------------------------------------------------------------------

function startList(table) {
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  async function refresh() {
    const response = await fetch(table.dataset.api, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) return;
    for (const job of await response.json()) {
      const row = table.querySelector(`[data-job-row="${job.id}"]`);
      if (!row) continue;
      const cancelling = job.cancel_requested && job.state === "running" ? ' <span class="muted small">cancelling…</span>' : "";
      row.querySelector('[data-cell="state"]').innerHTML = `<span class="job-state s-${esc(job.state)}" data-job-state>${esc(job.state)}</span>${cancelling}`;
      const eta = job.eta_seconds != null ? ` · ETA ${fmtDuration(job.eta_seconds)}` : "";
      row.querySelector('[data-cell="progress"]').innerHTML =
        `<div class="mini-bar" aria-hidden="true"><div style="width: ${(job.progress * 100).toFixed(1)}%"></div></div>` +
        `<span class="small">${job.step} / ${job.total_steps} steps${eta}</span>`;
      row.querySelector('[data-cell="queue"]').innerHTML =
        `<code>${esc(job.queue)}</code>${job.queue_position ? `<div class="small muted">position ${job.queue_position}</div>` : ""}`;
    }
  }
  setInterval(() => { refresh().catch(() => {}); }, 5000);
}

export function startJobs() {
  const dashboard = document.querySelector("[data-job-dashboard]");
  if (dashboard) window.jobDashboard = new Dashboard(dashboard);
  const overlay = document.querySelector("[data-job-overlay]");
  if (overlay) startOverlay(overlay);
  const list = document.querySelector("[data-jobs-list]");
  if (list) startList(list);
}
