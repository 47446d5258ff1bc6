// The workers page's live view: the server pushes the rendered workers table over /ws/workers/ whenever a worker
// advertises itself, beats or stops (and every few seconds regardless). Between pushes each heartbeat's age ticks
// here, from the time the server gave, so a worker that died is seen ageing. Reconnects with backoff.

import { wsUrl } from "./common.js";

function tickAges(container) {
  const now = Date.now();
  for (const cell of container.querySelectorAll("[data-heartbeat-at]")) {
    const at = Date.parse(cell.dataset.heartbeatAt);
    if (Number.isNaN(at)) continue;
    const seconds = Math.max(0, Math.round((now - at) / 1000));
    cell.textContent = seconds < 120 ? `${seconds} s ago` : `${Math.round(seconds / 60)} min ago`;
  }
}

export function startLiveWorkers(container) {
  const updated = document.getElementById("workers-updated");
  let delay = 1000;
  setInterval(() => tickAges(container), 1000);

  function connect() {
    const socket = new WebSocket(wsUrl("/ws/workers/"));
    socket.addEventListener("open", () => { delay = 1000; });
    socket.addEventListener("message", (event) => {
      const message = JSON.parse(event.data);
      if (message.type !== "workers") return;
      container.innerHTML = message.html;
      tickAges(container);
      if (updated) updated.textContent = `Live · updated at ${new Date().toLocaleTimeString()}`;
    });
    socket.addEventListener("close", () => {
      if (updated) updated.textContent = `Disconnected · retrying in ${Math.round(delay / 1000)} s`;
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    });
  }
  connect();
}
