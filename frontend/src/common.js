// What every page module shares: the CSRF token, websocket URLs, byte sizes, a job's terminal states.

// The states in which a job trains no more steps (builder/jobs/models.py TERMINAL_STATES; a preempted job resumes).
export const JOB_TERMINAL_STATES = new Set(["succeeded", "failed", "cancelled"]);

// The token Django's {% csrf_token %} put in the page (inside `root`), for the X-CSRFToken header; "" when none.
export function csrfToken(root = document) {
  return root.querySelector("input[name=csrfmiddlewaretoken]")?.value || "";
}

// The websocket URL of `path` (e.g. "/ws/jobs/7/") on this page's host, wss: when the page came over https.
export function wsUrl(path) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}${path}`;
}

// Bytes in binary units (1024), in one of two house styles:
// - "compact" (the dashboards): B, KB ... TB with 4 significant digits ("1.234 MB");
// - "filesize" (the dataset pages): what Django's filesizeformat writes beside it ("100 bytes", "1.5 MB").
// "–" when there is no number.
export function fmtBytes(v, style = "compact") {
  if (v == null || !Number.isFinite(v)) return "–";
  const filesize = style === "filesize";
  const units = filesize ? ["bytes", "KB", "MB", "GB"] : ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let x = v;
  while (Math.abs(x) >= 1024 && i < units.length - 1) { x /= 1024; i++; }
  if (filesize) return `${i ? x.toFixed(1) : x} ${units[i]}`;
  return `${i === 0 ? Math.round(x) : Number(x.toPrecision(4))} ${units[i]}`;
}
