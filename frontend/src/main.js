// Entry point of the browser bundle: htmx for server-rendered interactions, plus small page modules.
import htmx from "htmx.org";
import "./style.css";
import "./configs.css";
import { startLiveHealth } from "./health.js";
import { startDatasetUpload } from "./datasets.js";
import { startJobs } from "./jobs.js";
import { startReports } from "./reports.js";
import { startSweeps } from "./sweeps.js";
import { startLiveWorkers } from "./workers.js";

window.htmx = htmx;

document.addEventListener("DOMContentLoaded", () => {
  const health = document.querySelector("[data-live-health]");
  if (health) startLiveHealth(health);
  const upload = document.querySelector("[data-dataset-upload]");
  if (upload) startDatasetUpload(upload);
  const workers = document.querySelector("[data-live-workers]");
  if (workers) startLiveWorkers(workers);
  startJobs();
  startReports();
  startSweeps();
});
