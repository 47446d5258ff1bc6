"""The hardware profiles the web tier estimates with: ``workers.engine.hardware.PROFILES``, except that the CPU
profile describes the CPU of the live CPU workers when there are any: the rates they measured
(``workers.engine.probe``), the bf16 units they have and their RAM.

The CPU profile's own figures were measured on this platform's reference machine, and its bf16 units and RAM are
those of the machine the web tier runs on, which need not train anything: on hosts that share only the database,
Redis and storage, the workers' CPU can have AMX where the web host has none, or a quarter of its RAM. A worker
describes its CPU when it starts (a second of matmuls, small blocks, copies and dropouts; its /proc/cpuinfo bf16
units; its RAM) and advertises that with its devices; every estimate, advice, wizard proposal and launch check for
the ``cpu`` profile then uses it. A calibration (timed steps of a user's model) still corrects what remains, on top.

The registry of workers lives in ``builder.fleet``, above this app; it registers the function that describes the
live CPU workers (``register_cpu_workers_source``) when it is ready, as it registers its health section.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from django.db import DatabaseError

from workers.engine.hardware import PROFILES, CpuRates, HardwareProfile, cpu_profile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuWorkers:
    """What the live CPU workers advertise, reduced to what a job may count on wherever it lands: each rate's
    median over the workers that measured (None: none did), the bf16 units that every worker has, and the
    smallest RAM (None: none said)."""

    rates: CpuRates | None
    bf16_units: tuple[str, ...]
    memory_bytes: int | None


_cpu_workers_source: Callable[[str | None], CpuWorkers | None] | None = None


def register_cpu_workers_source(source: Callable[[str | None], CpuWorkers | None]) -> None:
    """Describe the CPU workers with ``source``, given a queue (its consumers) or None (all); None: no live CPU
    worker."""
    global _cpu_workers_source
    _cpu_workers_source = source


def cpu_workers(queue: str | None = None) -> CpuWorkers | None:
    """The live CPU workers' description (of ``queue``'s consumers when any is live); None without a source,
    without such a worker, or when the registry cannot be read (this host's CPU and the reference figures then
    serve, as before any worker started)."""
    if _cpu_workers_source is None:
        return None
    try:
        return _cpu_workers_source(queue)
    except DatabaseError:
        log.warning("could not read the CPU workers; estimating with this host's CPU", exc_info=True)
        return None


def _resolved(profile: HardwareProfile, workers: CpuWorkers | None) -> HardwareProfile:
    if profile.key != "cpu" or workers is None:
        return profile
    return cpu_profile(rates=workers.rates, units=workers.bf16_units, memory_bytes=workers.memory_bytes)


def hardware_profile(key: str, queue: str | None = None) -> HardwareProfile:
    """The profile called ``key`` (``KeyError`` for an unknown key, as ``PROFILES[key]``), the CPU's as its live
    workers describe it: those that consume ``queue`` (a hardware class's name) when given and any does."""
    profile = PROFILES[key]
    return _resolved(profile, cpu_workers(queue) if profile.key == "cpu" else None)


def hardware_profiles() -> dict[str, HardwareProfile]:
    """Every profile by key, in ``PROFILES``' order, the CPU's as its live workers describe it."""
    workers = cpu_workers()
    return {key: _resolved(profile, workers) for key, profile in PROFILES.items()}
