"""The live registry of workers, written by the workers themselves and read by the workers page and ``/healthz``.

A Celery worker, once ready (``workers.tasks.fleet``), starts a ``Presence``: it asks a child process what devices
the machine has (``workers.engine.devices``), writes its row (``advertise``) and renews ``heartbeat_at`` every
``WORKER_HEARTBEAT_SECONDS`` (``beat``); a warm shutdown marks it stopped (``retire``). Each write is followed by a
message to the Channels group ``workers`` (best effort: the page also refreshes by itself, and the database is the
record). What a worker runs is read from the jobs: the running job whose lease names the worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import subprocess
import sys
import threading
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from builder.core import hardware_classes
from builder.core.durable import Ticker
from builder.core.formatting import human_bytes
from builder.core.profiles import CpuWorkers
from builder.fleet.models import Worker
from builder.jobs.access import visible_jobs
from builder.jobs.models import Job, JobState
from workers.engine.hardware import BF16_CPU_UNITS, CpuRates

log = logging.getLogger(__name__)
GROUP = "workers"
# A worker is "silent" after this many missed heartbeats: it may be dead (the job reaper decides for its job).
SILENT_AFTER_BEATS = 3
# Stopped workers stay listed this long, so that a person sees which one went away.
STOPPED_SHOWN_FOR = timedelta(hours=1)
DETECT_TIMEOUT_SECONDS = 120


# -- what a worker writes -----------------------------------------------------------------------------------------


def detect_hardware() -> dict[str, Any]:
    """This machine's devices (``workers.engine.devices``), asked of a child process so that this one never
    initialises CUDA before Celery forks its pool; a CPU's rates measured unless ``WORKER_CPU_PROBE`` is off.
    ``{"device_type": "unknown", "error": ...}`` when it fails."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "workers.engine.devices", *([] if settings.WORKER_CPU_PROBE else ["--no-probe"])],
            capture_output=True,
            text=True,
            timeout=DETECT_TIMEOUT_SECONDS,
            check=True,
        )
        found = json.loads(done.stdout.strip().splitlines()[-1])
        return found if isinstance(found, dict) else {"device_type": "unknown", "error": "not a JSON object"}
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        stderr = getattr(exc, "stderr", "") or ""
        return {"device_type": "unknown", "error": f"{type(exc).__name__}: {exc} {stderr[-300:]}".strip()}


def advertise(name: str, pid: int, queues: list[str], hardware: dict[str, Any]) -> Worker:
    """Write (or renew) ``name``'s row as a worker that started now with ``hardware`` on ``queues``."""
    now = timezone.now()
    worker, _ = Worker.objects.update_or_create(
        name=name,
        defaults={
            "pid": pid,
            "queues": sorted(queues),
            "hardware": hardware,
            "started_at": now,
            "heartbeat_at": now,
            "stopped_at": None,
        },
    )
    publish_change()
    return worker


def beat(name: str, pid: int = 0, queues: list[str] | None = None, hardware: dict[str, Any] | None = None) -> bool:
    """Renew ``name``'s heartbeat (and write the row again, from what was advertised, if it was deleted). Never
    raises: a database hiccup must not stop the worker (the next beat tries again, and the page shows the
    heartbeat's age meanwhile)."""
    try:
        if not Worker.objects.filter(name=name).update(heartbeat_at=timezone.now(), stopped_at=None):
            advertise(name, pid, queues or [], hardware or {"device_type": "unknown", "error": "not advertised"})
        publish_change()
    except Exception:
        log.warning("could not renew worker %s's heartbeat", name, exc_info=True)
    return True


def retire(name: str) -> None:
    """Mark ``name`` stopped (a warm shutdown)."""
    Worker.objects.filter(name=name).update(stopped_at=timezone.now())
    publish_change()


def publish_change() -> None:
    """Tell the workers pages to read the registry again. Best effort, like every live message here."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(GROUP, {"type": "workers.changed"})
    except Exception:
        log.debug("could not publish to the workers group", exc_info=True)


def with_faster_rates(advertised: dict[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    """``found`` (a new ``detect_hardware``) with each CPU rate the faster of its own and ``advertised``'s
    (``CpuRates.best``); ``advertised`` unchanged when ``found`` has no valid rates (a probe that failed this
    time) or describes another kind of device."""
    if found.get("device_type") != "cpu" or advertised.get("device_type") != "cpu":
        return advertised
    try:
        new = CpuRates.from_dict(found.get("rates") or {})
    except ValueError:
        return advertised
    with contextlib.suppress(ValueError):  # nothing valid advertised yet: the new rates stand
        new = CpuRates.from_dict(advertised.get("rates") or {}).best(new)
    return {**found, "rates": new.as_dict(), "rates_error": None}


def _holds_a_job(name: str) -> bool:
    """Whether a running job's lease names worker ``name`` (``node:pid``, one per busy pool process)."""
    return Job.objects.filter(state=JobState.RUNNING, lease_owner__startswith=f"{name}:").exists()


class Presence:
    """A worker's presence in the registry: detect the hardware, advertise, then heartbeat until ``stop``; a CPU
    worker measures its CPU again every ``WORKER_PROBE_REFRESH_SECONDS`` while it trains nothing, and keeps the
    faster of each rate (a worker started beside others, or during a burst of load, first measures a slower CPU
    than it has)."""

    def __init__(self, name: str, pid: int, queues: list[str]) -> None:
        self.name, self.pid, self.queues = name, pid, queues
        self.hardware: dict[str, Any] = {}
        self._ticker = Ticker(
            f"worker-presence-{name}",
            lambda: beat(name, pid, queues, self.hardware),
            settings.WORKER_HEARTBEAT_SECONDS,
        )
        refresh = settings.WORKER_PROBE_REFRESH_SECONDS if settings.WORKER_CPU_PROBE else 0
        self._refresher = Ticker(f"worker-probe-{name}", self.refresh_rates, refresh) if refresh > 0 else None
        self._thread = threading.Thread(target=self._run, name=f"worker-advertise-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from django.db import connection

        try:
            self.hardware = detect_hardware()
            advertise(self.name, self.pid, self.queues, self.hardware)
            log.info("worker %s advertises %s on %s", self.name, describe(self.hardware), ", ".join(self.queues))
            for problem in mismatches(self.queues, self.hardware):
                log.warning("worker %s: %s", self.name, problem)
        except Exception:
            log.exception("worker %s could not advertise itself", self.name)
        finally:
            connection.close()
        self._ticker.start()
        if self._refresher is not None:
            self._refresher.start()

    def refresh_rates(self) -> bool:
        """Measure this CPU again unless the worker holds a running job (its training would slow the probe and
        the probe its training), and advertise the faster of each rate. Never raises, always True (the ticker
        goes on): a failed refresh leaves the advertised rates as they were."""
        try:
            if self.hardware.get("device_type") != "cpu" or _holds_a_job(self.name):
                return True
            updated = with_faster_rates(self.hardware, detect_hardware())
            if updated != self.hardware:
                self.hardware = updated
                Worker.objects.filter(name=self.name).update(hardware=updated)
                publish_change()
        except Exception:
            log.warning("worker %s could not measure its CPU again", self.name, exc_info=True)
        return True

    def stop(self) -> None:
        self._thread.join(timeout=DETECT_TIMEOUT_SECONDS)
        if self._ticker.is_alive():
            self._ticker.stop()
        if self._refresher is not None and self._refresher.is_alive():
            self._refresher.stop()
        try:
            retire(self.name)
        except Exception:
            log.warning("could not mark worker %s stopped", self.name, exc_info=True)


# -- what the page and /healthz read -------------------------------------------------------------------------------


def describe(hardware: dict[str, Any]) -> str:
    """``2 × NVIDIA A100-SXM4-80GB (cuda), 79.3 GiB each, bf16`` / ``2 cores of Intel Xeon (cpu), 23.5 GiB RAM, bf16
    (AMX, AVX-512 BF16); measured 250 GFLOP/s fp32 matmul`` (a CPU's native bf16 units and its matmul rate, as
    its worker reported them)."""
    kind = hardware.get("device_type", "unknown")
    if kind == "unknown":
        return f"unknown ({hardware.get('error', 'not detected yet')})"
    count, name = hardware.get("count", 1), hardware.get("name", "")
    memory = human_bytes(hardware.get("memory_bytes"))
    bf16 = ", bf16" if hardware.get("bf16") else ""
    if bf16 and hardware.get("bf16_units"):
        bf16 += f" ({', '.join(hardware['bf16_units'])})"
    if kind == "cpu":
        measured = ""
        rates = hardware.get("rates")
        if isinstance(rates, dict) and isinstance(rates.get("matmul_flops"), int | float):
            measured = f"; measured {rates['matmul_flops'] / 1e9:.0f} GFLOP/s fp32 matmul"
        elif hardware.get("rates_error"):
            measured = f"; its CPU could not be measured ({hardware['rates_error']})"
        return f"{count} core{'s' if count != 1 else ''} of {name} (cpu), {memory} RAM{bf16}{measured}"
    return f"{count} × {name} ({kind}), {memory} each{bf16}"


def mismatches(queues: list[str], hardware: dict[str, Any]) -> list[str]:
    """How the devices found differ from what the worker's hardware classes promise (launches are checked against
    the class, so a worker with less than its class has would fail jobs the platform accepted)."""
    problems = []
    classes = hardware_classes.classes()
    for name in queues:
        wanted = classes.get(name)
        if wanted is None or wanted.hardware.kind != "gpu" or hardware.get("device_type") == "unknown":
            continue
        if hardware.get("device_type") != "cuda" or hardware.get("profile") != wanted.profile:
            problems.append(f"class {name} expects {wanted.hardware.name}; this worker has {describe(hardware)}")
        elif int(hardware.get("count", 0)) < wanted.devices:
            problems.append(f"class {name} expects {wanted.devices} devices; this worker has {hardware.get('count')}")
    return problems


def _silent_after() -> timedelta:
    return timedelta(seconds=SILENT_AFTER_BEATS * settings.WORKER_HEARTBEAT_SECONDS)


def _live_cpu_hardware(queue: str | None = None) -> list[dict[str, Any]]:
    """The ``hardware`` of the live CPU workers; of those that consume ``queue`` when any does."""
    fresh = timezone.now() - _silent_after()
    rows = Worker.objects.filter(stopped_at__isnull=True, heartbeat_at__gte=fresh).values_list("hardware", "queues")
    cpu = [(h, q) for h, q in rows if isinstance(h, dict) and h.get("device_type") == "cpu"]
    consuming = [h for h, q in cpu if queue is not None and isinstance(q, list) and queue in q]
    return consuming or [h for h, _ in cpu]


def _median_rates(hardware: list[dict[str, Any]]) -> CpuRates | None:
    found = []
    for one in hardware:
        raw = one.get("rates")
        try:
            found.append(CpuRates.from_dict(raw if isinstance(raw, dict) else {}))
        except ValueError:
            continue  # an older worker (no rates), or a failed probe (rates_error says why on the workers page)
    if not found:
        return None
    return CpuRates(
        matmul_flops=statistics.median(r.matmul_flops for r in found),
        layer_seconds=statistics.median(r.layer_seconds for r in found),
        copy_bytes_per_s=statistics.median(r.copy_bytes_per_s for r in found),
        dropout_seconds_per_element=statistics.median(r.dropout_seconds_per_element for r in found),
        threads=int(statistics.median_low(r.threads for r in found)),
    )


_KNOWN_BF16_UNITS = frozenset(name for _, name in BF16_CPU_UNITS)


def _bf16_units(one: dict[str, Any]) -> set[str]:
    """The native bf16 units a worker advertised (known names only), none unless it also said bf16 runs there."""
    units = one.get("bf16_units")
    if one.get("bf16") is not True or not isinstance(units, list):
        return set()
    return {u for u in units if u in _KNOWN_BF16_UNITS}


def live_cpu_workers(queue: str | None = None) -> CpuWorkers | None:
    """What the live CPU workers advertised with their devices, reduced to what a job can count on wherever it
    lands (``builder.core.profiles`` builds the CPU profile from it): the median of each rate they measured when
    they started (``workers.engine.probe``), the bf16 units that all of them have, the smallest RAM. ``queue``: of
    the workers that consume that queue (a hardware class's machines; a job sent there lands on one of them), or
    of all while none does. None when no CPU worker is live. A stopped or silent worker does not count: the
    machine it described may be gone; rates, units or RAM that do not parse are left out (the workers page shows
    the probe's error)."""
    hardware = _live_cpu_hardware(queue)
    if not hardware:
        return None
    units = set.intersection(*(_bf16_units(one) for one in hardware))
    memory = [m for one in hardware if type(m := one.get("memory_bytes")) is int and m > 0]
    return CpuWorkers(
        rates=_median_rates(hardware),
        bf16_units=tuple(name for _, name in BF16_CPU_UNITS if name in units),
        memory_bytes=min(memory) if memory else None,
    )


def listed_workers() -> list[Worker]:
    """Workers running or stopped within ``STOPPED_SHOWN_FOR``, by name."""
    cutoff = timezone.now() - STOPPED_SHOWN_FOR
    return list(Worker.objects.exclude(stopped_at__lt=cutoff).exclude(stopped_at__isnull=True, heartbeat_at__lt=cutoff))


def _state(worker: Worker, now: Any) -> str:
    if worker.stopped_at is not None:
        return "stopped"
    return "silent" if now - worker.heartbeat_at > _silent_after() else "live"


def _running_jobs_by_worker() -> dict[str, list[Job]]:
    """Running jobs by the worker node that holds them (a lease names ``node:pid``, durable.this_worker): one per
    pool process, so a worker of concurrency N may hold N."""
    running = Job.objects.filter(state=JobState.RUNNING).exclude(lease_owner="").only("pk", "name", "lease_owner")
    by_worker: dict[str, list[Job]] = {}
    for job in running.order_by("pk"):
        by_worker.setdefault(job.lease_owner.rsplit(":", 1)[0], []).append(job)
    return by_worker


def rows_for(user: Any) -> list[dict[str, Any]]:
    """The workers page's rows for ``user``. A current job (``jobs``: one per busy pool process) that ``user`` may
    see (theirs, or shared with them) has its name and link; anyone else's is only "busy": an outsider learns
    neither its name, its id nor its owner."""
    now = timezone.now()
    workers = listed_workers()
    jobs = _running_jobs_by_worker()
    held = [job.pk for held_jobs in jobs.values() for job in held_jobs]
    visible = set(visible_jobs(user).filter(pk__in=held).values_list("pk", flat=True))
    rows = []
    for worker in workers:
        current = [
            {"visible": True, "id": job.pk, "name": job.name, "url": reverse("jobs:detail", args=[job.pk])}
            if job.pk in visible
            else {"visible": False}
            for job in (jobs.get(worker.name, []) if worker.stopped_at is None else [])
        ]
        rows.append(
            {
                "name": worker.name,
                "state": _state(worker, now),
                "queues": worker.queues,
                "classes": hardware_classes.queue_classes(worker.queues),
                "hardware": worker.hardware,
                "hardware_text": describe(worker.hardware),
                "mismatches": mismatches(worker.queues, worker.hardware),
                "jobs": current,
                "heartbeat_at": worker.heartbeat_at.isoformat(),
                "heartbeat_age_s": round((now - worker.heartbeat_at).total_seconds(), 1),
                "started_at": worker.started_at.isoformat(),
            }
        )
    return rows


def advertised_workers() -> list[dict[str, Any]]:
    """For ``/healthz`` (public): each listed worker's hardware, queues, state and heartbeat age; no job."""
    now = timezone.now()
    return [
        {
            "name": worker.name,
            "state": _state(worker, now),
            "queues": worker.queues,
            "hardware": {k: worker.hardware.get(k) for k in ("device_type", "count", "name", "memory_bytes", "bf16")},
            "heartbeat_age_s": round((now - worker.heartbeat_at).total_seconds(), 1),
        }
        for worker in listed_workers()
    ]
