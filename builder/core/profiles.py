"""The hardware profiles the web tier estimates with: ``workers.engine.hardware.PROFILES``, except that the CPU
profile takes the rates its live workers measured of their CPU (``workers.engine.probe``) when any did.

The CPU profile's own figures were measured on this platform's reference machine; the same step takes up to
twice as long on another CPU or under other load, and an estimate made with them misleads until someone
calibrates. A worker measures its CPU when it starts (a second of matmuls, small blocks, copies and dropouts) and
advertises the rates with its devices; every estimate, advice, wizard proposal and launch check for the ``cpu``
profile then uses them. A calibration (timed steps of a user's model) still corrects what remains, on top.

The registry of workers lives in ``builder.fleet``, above this app; it registers the function that reads the live
workers' rates (``register_cpu_rates_source``) when it is ready, as it registers its health section.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import DatabaseError

from workers.engine.hardware import PROFILES, CpuRates, HardwareProfile, cpu_profile

log = logging.getLogger(__name__)

_cpu_rates_source: Callable[[], CpuRates | None] | None = None


def register_cpu_rates_source(source: Callable[[], CpuRates | None]) -> None:
    """Read the CPU rates from ``source`` (None: no live worker measured any)."""
    global _cpu_rates_source
    _cpu_rates_source = source


def cpu_rates() -> CpuRates | None:
    """The rates the live CPU workers measured; None without a source, without such a worker, or when the
    registry cannot be read (the reference figures then serve, as before any worker started)."""
    if _cpu_rates_source is None:
        return None
    try:
        return _cpu_rates_source()
    except DatabaseError:
        log.warning("could not read the workers' CPU rates; estimating with the reference figures", exc_info=True)
        return None


def _resolved(profile: HardwareProfile, rates: CpuRates | None) -> HardwareProfile:
    return cpu_profile(rates=rates) if profile.key == "cpu" and rates is not None else profile


def hardware_profile(key: str) -> HardwareProfile:
    """The profile called ``key`` (``KeyError`` for an unknown key, as ``PROFILES[key]``), the CPU's with its
    workers' measured rates."""
    profile = PROFILES[key]
    return _resolved(profile, cpu_rates() if profile.key == "cpu" else None)


def hardware_profiles() -> dict[str, HardwareProfile]:
    """Every profile by key, in ``PROFILES``' order, the CPU's with its workers' measured rates."""
    rates = cpu_rates()
    return {key: _resolved(profile, rates) for key, profile in PROFILES.items()}
