// Dataset upload: the text/label column picker and a chunked, resumable upload with a progress bar.
//
// The file is sent as consecutive chunks (PUT /api/datasets/uploads/<id>?offset=N), each its own request, so no
// request body is ever large; a chunk whose response is lost is resumed from the offset the server reports.
import "./datasets.css";
import { csrfToken, fmtBytes } from "./common.js";

const HEAD_BYTES = 64 * 1024; // enough of the file to read a CSV header or the first JSON line
const EXTENSIONS = { jsonl: "jsonl", ndjson: "jsonl", json: "jsonl", csv: "csv", txt: "txt", text: "txt" };
const MAX_RETRIES = 5;

function formatOf(file, declared) {
  if (declared) return declared;
  const ext = (file.name.split(".").pop() || "").toLowerCase();
  return EXTENSIONS[ext] || "";
}

// The first record of a CSV text (quotes and doubled quotes respected), as a list of trimmed cells.
export function parseCsvHeader(text) {
  const cells = [];
  let cell = "";
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { cell += '"'; i++; }
      else if (c === '"') quoted = false;
      else cell += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { cells.push(cell.trim()); cell = ""; }
    else if (c === "\n" || c === "\r") { if (cells.length || cell) break; }
    else cell += c;
  }
  if (cell || cells.length) cells.push(cell.trim());
  return cells.filter((c) => c !== "");
}

// Field names in the head of the file, the string-valued (likely text) ones first.
async function columnsOf(file, fmt) {
  if (fmt === "txt" || !fmt) return [];
  const head = (await file.slice(0, HEAD_BYTES).text()).replace(/^\ufeff/, "");
  if (fmt === "csv") return parseCsvHeader(head);
  const line = head.split("\n").find((l) => l.trim());
  if (!line) return [];
  try {
    const obj = JSON.parse(line);
    if (!obj || typeof obj !== "object" || Array.isArray(obj)) return [];
    const keys = Object.keys(obj);
    return [...keys.filter((k) => typeof obj[k] === "string"), ...keys.filter((k) => typeof obj[k] !== "string")];
  } catch {
    return []; // the first line is not JSON (or longer than the head): the worker will say which line is bad
  }
}

function request(method, url, { body = null, headers = {}, onProgress = null } = {}) {
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, url);
    for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
    if (onProgress) xhr.upload.onprogress = (e) => onProgress(e.loaded);
    xhr.onload = () => {
      let parsed = {};
      try { parsed = xhr.responseText ? JSON.parse(xhr.responseText) : {}; } catch { parsed = { detail: xhr.responseText.slice(0, 300) }; }
      resolve({ status: xhr.status, body: parsed });
    };
    xhr.onerror = () => resolve({ status: 0, body: { detail: "the network request failed" } });
    xhr.send(body);
  });
}

export function startDatasetUpload(form) {
  const fileInput = form.querySelector("#upload-file");
  const formatSelect = form.querySelector("#upload-format");
  const textField = form.querySelector("#upload-text-field");
  const labelField = form.querySelector("#upload-label-field");
  const columns = form.querySelector("#upload-columns");
  const hint = form.querySelector("#upload-columns-hint");
  const submit = form.querySelector("#upload-submit");
  const box = form.querySelector("#upload-progress-box");
  const bar = form.querySelector("#upload-progress");
  const barText = form.querySelector("#upload-progress-text");
  const csrf = csrfToken(form);
  const jsonHeaders = { "Content-Type": "application/json", "X-CSRFToken": csrf, Accept: "application/json" };

  function clearErrors() {
    for (const el of form.querySelectorAll("[data-error-for]")) { el.hidden = true; el.textContent = ""; }
  }

  function showErrors(body) {
    let shown = false;
    for (const [field, value] of Object.entries(body || {})) {
      const el = form.querySelector(`[data-error-for="${field}"]`) || form.querySelector('[data-error-for="detail"]');
      if (!el || !(Array.isArray(value) || typeof value === "string")) continue;
      const text = Array.isArray(value) ? value.join(" ") : value;
      el.textContent = el.dataset.errorFor === field ? text : `${field}: ${text}`;
      el.hidden = false;
      shown = true;
    }
    if (!shown) showErrors({ detail: "the upload failed" });
  }

  function setProgress(done, total) {
    const pct = total ? Math.min(100, (100 * done) / total) : 100;
    bar.value = pct;
    barText.textContent = `${fmtBytes(done, "filesize")} of ${fmtBytes(total, "filesize")} (${Math.floor(pct)}%)`;
  }

  async function refreshColumns() {
    const file = fileInput.files[0];
    if (!file) return;
    const fmt = formatOf(file, formatSelect.value);
    for (const el of form.querySelectorAll("[data-columns]")) el.hidden = fmt === "txt";
    const found = await columnsOf(file, fmt);
    columns.replaceChildren(...found.map((c) => Object.assign(document.createElement("option"), { value: c })));
    hint.hidden = !found.length;
    hint.textContent = found.length ? `Fields in the first record: ${found.join(", ")}` : "";
    if (found.length) {
      if (!found.includes(textField.value)) textField.value = found.includes("text") ? "text" : found[0];
      if (labelField.value && !found.includes(labelField.value)) labelField.value = "";
      if (!labelField.value && found.includes("label")) labelField.value = "label";
    }
  }

  fileInput.addEventListener("change", refreshColumns);
  formatSelect.addEventListener("change", refreshColumns);

  async function sendChunks(session, file) {
    let offset = session.received;
    let failures = 0;
    while (offset < file.size) {
      const end = Math.min(offset + session.chunk_size, file.size);
      const start = offset;
      const resp = await request("PUT", `${session.upload_url}?offset=${start}`, {
        body: file.slice(start, end),
        headers: { "Content-Type": "application/octet-stream", "X-CSRFToken": csrf, Accept: "application/json" },
        onProgress: (loaded) => setProgress(start + loaded, file.size),
      });
      if (resp.status === 200) {
        offset = resp.body.received;
        failures = 0;
      } else if (resp.status === 409 && typeof resp.body.received === "number") {
        offset = resp.body.received; // the server has more (or less) than we thought: resume from there
      } else if (resp.status === 0 && failures < MAX_RETRIES) {
        failures++;
        await new Promise((r) => setTimeout(r, 1000 * failures));
        const state = await request("GET", session.upload_url, { headers: { Accept: "application/json" } });
        if (state.status === 200) offset = state.body.received;
      } else {
        showErrors(resp.body);
        return false;
      }
      setProgress(offset, file.size);
    }
    return true;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const file = fileInput.files[0];
    if (!file) { showErrors({ file: ["choose a file to upload"] }); return; }
    const maxBytes = Number(form.dataset.maxBytes);
    if (file.size > maxBytes) { showErrors({ file: [`the file is ${fmtBytes(file.size, "filesize")}; the largest upload is ${fmtBytes(maxBytes, "filesize")}`] }); return; }
    submit.disabled = true;
    box.hidden = false;
    setProgress(0, file.size);
    const fmt = formatOf(file, formatSelect.value);
    const start = await request("POST", form.dataset.startUrl, {
      headers: jsonHeaders,
      body: JSON.stringify({
        filename: file.name,
        size: file.size,
        name: form.querySelector("#upload-name").value,
        format: formatSelect.value,
        text_field: fmt === "txt" ? "text" : textField.value.trim(),
        label_field: fmt === "txt" ? "" : labelField.value.trim(),
      }),
    });
    if (start.status !== 201) { showErrors(start.body); submit.disabled = false; box.hidden = true; return; }
    if (!(await sendChunks(start.body, file))) { submit.disabled = false; return; }
    const done = await request("POST", `${start.body.upload_url}/complete`, { headers: jsonHeaders });
    if (done.status !== 202) { showErrors(done.body); submit.disabled = false; return; }
    setProgress(file.size, file.size);
    barText.textContent += " · uploaded, a worker is validating it…";
    form.dataset.uploaded = String(done.body.id);
    window.location.assign(done.body.page);
  });
}
