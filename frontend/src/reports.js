// Reports: the playground (prompt → tokens streamed over /ws/playground/<job>/), a pending report page that
// reloads itself when the worker is done, and the reports panel of a job's dashboard.
//
// Playground protocol (builder/reports/consumers.py): the server says ``loading`` then ``ready`` (task, labels,
// limits) once it has loaded the checkpoint; a request gets ``start``, then ``token`` messages (``text``), then
// ``done`` — or ``labels`` (``probabilities``) then ``done`` for a classifier. A bad field gets
// ``{type: "error", field, message}``, shown next to that field; the socket stays open.
import "./reports.css";
import { JOB_TERMINAL_STATES, wsUrl } from "./common.js";

class Playground {
  constructor(root) {
    this.root = root;
    this.config = JSON.parse(root.querySelector("#playground-config").textContent);
    this.form = root.querySelector("[data-pg-form]");
    this.run = root.querySelector("[data-action=run]");
    this.stopButton = root.querySelector("[data-action=stop]");
    this.status = root.querySelector("[data-field=status]");
    this.stats = root.querySelector("[data-field=stats]");
    this.generated = root.querySelector("[data-field=generated]");
    this.echo = root.querySelector("[data-field=prompt-echo]");
    this.labels = root.querySelector("[data-field=labels]");
    this.busy = false;
    this.tokens = 0;
    const temperature = root.querySelector("[name=temperature]");
    if (temperature) {
      const shown = root.querySelector("[data-show=temperature]");
      temperature.addEventListener("input", () => { shown.textContent = Number(temperature.value).toFixed(2); });
    }
    this.form.addEventListener("submit", (e) => { e.preventDefault(); this.submit(); });
    if (this.stopButton) this.stopButton.addEventListener("click", () => this.send({ type: "stop" }));
    this.connect();
  }

  setStatus(state, text) {
    this.status.dataset.state = state;
    this.status.textContent = text;
  }

  connect() {
    this.socket = new WebSocket(wsUrl(this.config.ws));
    this.socket.addEventListener("message", (e) => this.handle(JSON.parse(e.data)));
    this.socket.addEventListener("close", () => {
      this.run.disabled = true;
      this.setStatus("closed", "Disconnected. Reload the page to reconnect.");
    });
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(message));
  }

  clearErrors() {
    for (const el of this.root.querySelectorAll("[data-error-for]")) { el.hidden = true; el.textContent = ""; }
    for (const el of this.root.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  }

  showError(field, message) {
    const slot = this.root.querySelector(`[data-error-for="${field}"]`) || this.root.querySelector('[data-error-for=""]');
    slot.textContent = message;
    slot.hidden = false;
    const input = this.root.querySelector(`[data-field-input="${field}"]`);
    if (input) input.setAttribute("aria-invalid", "true");
  }

  // The form's values as the server wants them. Numbers are sent as typed (the server validates and names
  // the field at fault), so an empty box becomes null rather than a silent default.
  request() {
    const value = (name) => this.form.elements[name]?.value;
    const number = (name) => (value(name) === "" || value(name) == null ? null : Number(value(name)));
    if (this.config.task === "classification") return { type: "classify", text: value("prompt") };
    return {
      type: "generate",
      prompt: value("prompt"),
      temperature: number("temperature"),
      top_k: number("top_k"),
      top_p: number("top_p"),
      max_tokens: number("max_tokens"),
      seed: number("seed"),
    };
  }

  submit() {
    if (this.busy) return;
    this.clearErrors();
    const request = this.request();
    this.busy = true;
    this.run.disabled = true;
    this.tokens = 0;
    if (this.generated) {
      this.generated.textContent = "";
      this.generated.dataset.tokens = "0";
      this.echo.textContent = request.prompt;
    }
    if (this.labels) this.labels.replaceChildren();
    this.stats.textContent = "";
    this.root.dataset.state = "sent";
    this.send(request);
  }

  finish(state) {
    this.busy = false;
    this.run.disabled = false;
    if (this.stopButton) this.stopButton.hidden = true;
    this.root.dataset.state = state;
  }

  handle(msg) {
    switch (msg.type) {
      case "loading":
        this.setStatus("loading", `Loading the checkpoint of step ${msg.checkpoint_step}…`);
        break;
      case "ready": {
        this.limits = msg.limits;
        const max = this.form.elements.max_tokens;
        if (max) max.max = msg.limits.max_tokens;
        this.setStatus("ready", `Ready: step ${msg.checkpoint_step}${msg.labels ? `, ${msg.labels.length} labels` : ""}.`);
        this.run.disabled = false;
        this.root.dataset.state = "ready";
        break;
      }
      case "start":
        this.root.dataset.state = "running";
        if (this.stopButton) this.stopButton.hidden = false;
        break;
      case "token":
        this.tokens += 1;
        this.generated.append(document.createTextNode(msg.text));
        this.generated.dataset.tokens = String(this.tokens);
        break;
      case "labels":
        for (const { label, p } of msg.probabilities) {
          const li = document.createElement("li");
          li.dataset.label = label;
          const name = document.createElement("span");
          name.className = "pg-label";
          name.textContent = label;
          const bar = document.createElement("span");
          bar.className = "pg-bar";
          bar.style.setProperty("--p", String(p));
          const value = document.createElement("span");
          value.className = "pg-p";
          value.textContent = `${(100 * p).toFixed(1)}%`;
          li.append(name, bar, value);
          this.labels.append(li);
        }
        break;
      case "done":
        this.stats.textContent = this.config.task === "classification"
          ? `${msg.seconds.toFixed(2)} s`
          : `${msg.tokens} ${msg.tokens === 1 ? "piece" : "pieces"} in ${msg.seconds.toFixed(2)} s${ENDED[msg.stopped] || ""}`;
        this.finish("done");
        break;
      case "error":
        this.showError(msg.field || "", msg.message);
        if (this.busy) this.finish("error");
        if (msg.field === "report") { this.setStatus("error", msg.message); this.run.disabled = true; }
        break;
      default:
        break;
    }
  }
}

// Why a generation ended, after its statistics. A model that ends the text at once (its first token is <eos>)
// says so, rather than leaving an empty output unexplained.
const ENDED = {
  eos: ": the model ended the text",
  max_tokens: ": max tokens reached",
  stop: " (stopped)",
};

async function fetchJson(url) {
  try {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    return response.ok ? await response.json() : null;
  } catch (err) {
    return null; // the server is restarting: the next state change asks again
  }
}

// A queued or running report: ask the API every 2 s and reload when the worker has finished.
function watchPendingReport(root) {
  const api = root.dataset.statusApi;
  const poll = async () => {
    try {
      const response = await fetch(api, { headers: { Accept: "application/json" } });
      if (response.ok) {
        const report = await response.json();
        if (report.state === "succeeded" || report.state === "failed") { window.location.reload(); return; }
      }
    } catch (err) { /* the server restarts: try again */ }
    window.setTimeout(poll, 2000);
  };
  window.setTimeout(poll, 2000);
}

// A job's dashboard: when the job stops, show Evaluate (owner) and the reports that appear (the automatic one
// after a success is queued by the worker a moment after the state changes).
function watchJobReports(panel) {
  const dashboard = document.querySelector("[data-job-dashboard]");
  if (!dashboard) return;
  const form = panel.querySelector("[data-evaluate-form]");
  let polls = 0;
  const refresh = async () => {
    const reports = await fetchJson(panel.dataset.api);
    if (!reports) return [];
    const list = panel.querySelector("[data-field=reports]");
    list.replaceChildren(...reports.map((r) => {
      const a = document.createElement("a");
      a.className = "btn";
      a.href = r.page;
      a.dataset.reportLink = String(r.id);
      a.textContent = reports.length > 1 ? `Report (step ${r.checkpoint_step}) ` : "Report ";
      const pill = document.createElement("span");
      pill.className = `job-state s-${r.state}`;
      pill.textContent = r.state;
      a.append(pill);
      return a;
    }));
    return reports;
  };
  const onState = async () => {
    const state = dashboard.dataset.state;
    if (!JOB_TERMINAL_STATES.has(state)) { if (form) form.hidden = true; return; }
    const [reports, job] = await Promise.all([refresh(), fetchJson(panel.dataset.jobApi)]);
    const last = job ? job.last_checkpoint_step : null;
    if (form) form.hidden = last == null || reports.some((r) => r.checkpoint_step === last);
    // After a success the automatic report appears within a moment: look again a few times.
    if (state === "succeeded" && reports.length === 0 && polls++ < 10) window.setTimeout(onState, 1500);
  };
  new MutationObserver(onState).observe(dashboard, { attributes: true, attributeFilter: ["data-state"] });
}

export function startReports() {
  const playground = document.querySelector("[data-playground]");
  if (playground) window.playground = new Playground(playground);
  const pending = document.querySelector("[data-report-page]");
  if (pending && (pending.dataset.state === "queued" || pending.dataset.state === "running")) watchPendingReport(pending);
  const panel = document.querySelector("[data-job-reports]");
  if (panel) watchJobReports(panel);
}
