// The status page's live view: the server pushes the rendered health table over /ws/status/.
// Reconnects with backoff; the page keeps its last table (and says how old it is) while disconnected.

import { wsUrl } from "./common.js";

export function startLiveHealth(container) {
  const overall = document.getElementById("overall");
  const updated = document.getElementById("health-updated");
  let delay = 1000;

  function connect() {
    const socket = new WebSocket(wsUrl("/ws/status/"));
    socket.addEventListener("open", () => { delay = 1000; });
    socket.addEventListener("message", (event) => {
      const message = JSON.parse(event.data);
      if (message.type !== "health") return;
      container.innerHTML = message.html;
      overall.textContent = message.report.status;
      overall.className = `pill ${message.report.status === "ok" ? "ok" : "fail"}`;
      updated.textContent = `Live · checked at ${new Date().toLocaleTimeString()}`;
    });
    socket.addEventListener("close", () => {
      updated.textContent = `Disconnected · retrying in ${Math.round(delay / 1000)} s`;
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    });
  }
  connect();
}
