// Entry point of the browser bundle: htmx for server-rendered interactions, plus small page modules.
import htmx from "htmx.org";
import "./style.css";
import { startLiveHealth } from "./health.js";

window.htmx = htmx;

document.addEventListener("DOMContentLoaded", () => {
  const health = document.querySelector("[data-live-health]");
  if (health) startLiveHealth(health);
});
