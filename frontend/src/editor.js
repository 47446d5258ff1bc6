// The JSON spec editor (its own bundle, editor.js, loaded only by the editor page): CodeMirror 6 driven by the
// spec's JSON Schema through codemirror-json-schema (validation, key/enum completion, descriptions on hover),
// plus the server's validation for the cross-field rules a JSON Schema cannot express. Every problem is shown
// at its line and listed with its field path. Saving goes through the API, which validates again with the
// same schema; its errors are mapped back onto the lines of their fields.

import { EditorView, basicSetup } from "codemirror";
import { EditorState } from "@codemirror/state";
import { hoverTooltip, keymap } from "@codemirror/view";
import { json, jsonLanguage } from "@codemirror/lang-json";
import { linter, lintGutter, forEachDiagnostic, forceLinting, setDiagnostics } from "@codemirror/lint";
import { syntaxTree } from "@codemirror/language";
import { indentWithTab } from "@codemirror/commands";
import { jsonSchemaLinter, jsonSchemaHover, jsonCompletion, stateExtensions } from "codemirror-json-schema";
import { csrfToken } from "./common.js";
import { isMissingDiscriminator, toDraft04 } from "./schema-draft04.js";

const boot = JSON.parse(document.getElementById("editor-boot").textContent);
const csrf = csrfToken();
const $ = (selector) => document.querySelector(selector);

// -- positions of field paths ------------------------------------------------------------------------------

function unquote(state, node) {
  try {
    return JSON.parse(state.doc.sliceString(node.from, node.to));
  } catch {
    return null;
  }
}

// The document range of a dotted path ("model.moe.top_k"): the property (name and value) when it is present,
// else the deepest object on the way (a missing key is reported at the object that should hold it).
export function rangeOfPath(state, path) {
  const tree = syntaxTree(state);
  let node = tree.topNode.firstChild; // the root value
  let range = node ? { from: node.from, to: Math.min(node.to, node.from + 1) } : { from: 0, to: 0 };
  if (!path) return range;
  for (const key of path.split(".")) {
    if (!node) break;
    let found = null;
    if (node.name === "Object") {
      for (let prop = node.firstChild; prop; prop = prop.nextSibling) {
        if (prop.name !== "Property") continue;
        const name = prop.getChild("PropertyName");
        if (name && unquote(state, name) === key) {
          found = prop;
          break;
        }
      }
    } else if (node.name === "Array" && /^\d+$/.test(key)) {
      let index = 0;
      for (let item = node.firstChild; item; item = item.nextSibling) {
        if (["[", "]", ","].includes(item.name)) continue;
        if (index++ === Number(key)) {
          found = item;
          break;
        }
      }
    }
    if (!found) break;
    range = { from: found.from, to: found.to };
    node = found.name === "Property" ? found.lastChild : found;
  }
  return range;
}

// -- linting: parse errors, then the JSON Schema, then the server's cross-field rules ------------------------

const schemaLint = jsonSchemaLinter();
let lastServer = { text: null, result: null };

async function serverValidate(text) {
  if (lastServer.text === text) return lastServer.result;
  const response = await fetch(boot.api.validate, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
    body: JSON.stringify({ spec: JSON.parse(text), hardware: $("#editor-hw").value }),
  });
  const result = response.ok ? await response.json() : null;
  lastServer = { text, result };
  return result;
}

function parseDiagnostic(state, text) {
  try {
    JSON.parse(text);
    return null;
  } catch (error) {
    // The syntax tree marks where parsing failed; fall back to the end of the document.
    let at = state.doc.length;
    syntaxTree(state).iterate({
      enter: (node) => {
        if (node.type.isError && node.from < at) at = node.from;
      },
    });
    return { from: at, to: Math.min(state.doc.length, at + 1), severity: "error", source: "json", message: `Not valid JSON: ${error.message}` };
  }
}

function pathDiagnostic(state, error, source) {
  const { from, to } = rangeOfPath(state, error.path);
  const label = error.path || "spec";
  return { from, to, severity: "error", source, message: `${label}: ${error.message}` };
}

// The text the current diagnostics belong to: until the linter has run on the text on screen, the status
// says "checking" (replacing the whole document drops the old diagnostics before new ones exist).
let lintedText = null;

async function lintSpec(view) {
  const state = view.state;
  const text = state.doc.toString();
  const done = (diagnostics) => {
    if (view.state.doc.toString() === text) lintedText = text;
    return diagnostics;
  };
  const parse = parseDiagnostic(state, text);
  if (parse) return done([parse]);
  const schemaDiagnostics = schemaLint(view)
    .filter((d) => !isMissingDiscriminator(d.message))
    .map((d) => ({ ...d, source: d.source || "schema" }));
  if (schemaDiagnostics.length) return done(schemaDiagnostics);
  // The schema is satisfied: what is left are the cross-field rules, which only the server checks.
  const result = await serverValidate(text).catch(() => null);
  if (view.state.doc.toString() !== text) return []; // outdated: another run follows
  if (!result) return done([{ from: 0, to: 0, severity: "warning", source: "server", message: "The server could not check this spec; try again." }]);
  showAdvice(result.warnings || []);
  return done(result.errors.map((e) => pathDiagnostic(view.state, e, "server")));
}

// -- the problems list and the estimate ------------------------------------------------------------------------

function listProblems(state) {
  const items = [];
  forEachDiagnostic(state, (d, from) => {
    const line = state.doc.lineAt(from);
    items.push({ line: line.number, column: from - line.from + 1, message: d.message, from });
  });
  const list = $("#editor-problems");
  list.replaceChildren(
    ...items.map((item) => {
      const li = document.createElement("li");
      li.dataset.line = item.line;
      const where = document.createElement("button");
      where.type = "button";
      where.className = "cfg-linkish";
      where.textContent = `line ${item.line}:${item.column}`;
      where.addEventListener("click", () => {
        view.dispatch({ selection: { anchor: item.from }, scrollIntoView: true });
        view.focus();
      });
      li.append(where, document.createTextNode(` ${item.message}`));
      return li;
    }),
  );
  const status = $("#editor-status");
  const checked = lintedText === state.doc.toString();
  if (!checked) {
    status.textContent = "checking…";
    status.className = "cfg-risk";
    status.dataset.valid = "pending";
  } else {
    status.textContent = items.length ? `${items.length} problem${items.length > 1 ? "s" : ""}` : "Valid";
    status.className = `cfg-risk ${items.length ? "will_not_fit" : "fits"}`;
    status.dataset.valid = items.length ? "false" : "true";
  }
  // An estimate of the last valid text would mislead while the text on screen is not (yet) valid.
  $("#editor-estimate").classList.toggle("cfg-stale", !checked || items.length > 0);
  return checked ? items.length : -1;
}

function showAdvice(warnings) {
  const box = $("#editor-advice");
  $("#editor-advice-none").hidden = warnings.length > 0;
  box.replaceChildren(
    ...warnings.map((a) => {
      const li = document.createElement("li");
      li.className = a.severity;
      li.dataset.code = a.code;
      li.innerHTML = `<span class="cfg-pill ${a.severity}"></span> <code></code> <span class="msg"></span><div class="fix"></div>`;
      li.querySelector(".cfg-pill").textContent = a.severity;
      li.querySelector("code").textContent = a.path;
      li.querySelector(".msg").textContent = a.message;
      li.querySelector(".fix").textContent = `→ ${a.fix}`;
      return li;
    }),
  );
}

let estimateTimer = null;
function refreshEstimate() {
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(async () => {
    if ($("#editor-status").dataset.valid !== "true") return;
    const body = new URLSearchParams({ spec: view.state.doc.toString(), hw: $("#editor-hw").value, gpus: $("#editor-gpus").value });
    const response = await fetch(boot.api.panel, { method: "POST", headers: { "X-CSRFToken": csrf }, body });
    $("#editor-estimate").innerHTML = await response.text();
  }, 500);
}

// -- the editor ------------------------------------------------------------------------------------------------

let problemsShown = -1;
const view = new EditorView({
  parent: $("#editor"),
  state: EditorState.create({
    doc: JSON.stringify(boot.spec, null, 2),
    extensions: [
      basicSetup,
      keymap.of([indentWithTab]),
      json(),
      lintGutter(),
      linter(lintSpec, { delay: 400 }),
      jsonLanguage.data.of({ autocomplete: jsonCompletion() }),
      hoverTooltip(jsonSchemaHover()),
      stateExtensions(toDraft04(boot.schema)),
      EditorView.updateListener.of((update) => {
        const count = listProblems(update.state);
        if (update.docChanged) $("#editor-dirty").hidden = false;
        if (count === 0 && problemsShown !== 0) refreshEstimate();
        problemsShown = count;
      }),
    ],
  }),
});
window.specEditor = view; // for the browser tests and the console

function setDoc(text) {
  view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: text } });
}

$("#editor-format").addEventListener("click", () => {
  try {
    setDoc(JSON.stringify(JSON.parse(view.state.doc.toString()), null, 2));
  } catch {
    forceLinting(view); // the parse error is already marked at its line
  }
});

$("#editor-template").addEventListener("change", (event) => {
  const name = event.target.value;
  if (!name) return;
  setDoc(JSON.stringify(boot.templates[name], null, 2));
  event.target.value = "";
});

$("#editor-upload").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  setDoc(await file.text()); // shown as is: a bad file is marked like any other text
  event.target.value = "";
});

$("#editor-download").addEventListener("click", () => {
  const name = ($("#editor-name")?.value || boot.config?.name || "spec").replace(/[^\w.-]+/g, "-");
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([view.state.doc.toString()], { type: "application/json" }));
  link.download = `${name}.json`;
  link.click();
  URL.revokeObjectURL(link.href);
});

for (const id of ["#editor-hw", "#editor-gpus"]) {
  $(id).addEventListener("change", () => {
    lastServer = { text: null, result: null };
    forceLinting(view);
    refreshEstimate();
  });
}

// -- save ------------------------------------------------------------------------------------------------------

$("#editor-save").addEventListener("click", async () => {
  const status = $("#editor-save-status");
  const text = view.state.doc.toString();
  let spec;
  try {
    spec = JSON.parse(text);
  } catch {
    status.textContent = "Not saved: the document is not valid JSON (see the marked line).";
    return;
  }
  const note = $("#editor-note").value;
  const url = boot.config ? boot.api.versions : boot.api.create;
  const payload = boot.config
    ? { spec, note, source: "editor" }
    : { name: $("#editor-name").value, description: $("#editor-description").value, spec, note, source: "editor" };
  status.textContent = "Saving…";
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
    body: JSON.stringify(payload),
  });
  const body = await response.json().catch(() => ({}));
  if (response.status === 201) {
    $("#editor-dirty").hidden = true;
    const id = boot.config ? boot.config.id : body.id;
    status.textContent = "Saved.";
    window.location.href = boot.api.detail.replace("{id}", id);
    return;
  }
  const errors = body.errors || [{ path: "", message: `the server answered ${response.status}` }];
  // Errors on the spec go to their lines; others (name, note) next to the button.
  const specErrors = errors.filter((e) => e.path === "spec" || e.path.startsWith("spec."));
  const other = errors.filter((e) => !specErrors.includes(e));
  status.textContent = `Not saved: ${errors.map((e) => `${e.path || "request"}: ${e.message}`).join("; ")}`;
  status.dataset.errors = JSON.stringify(errors);
  if (specErrors.length) {
    view.dispatch(setDiagnostics(view.state, specErrors.map((e) => pathDiagnostic(view.state, { path: e.path.replace(/^spec\.?/, ""), message: e.message }, "server"))));
  }
  if (other.length) $("#editor-name")?.focus();
});
