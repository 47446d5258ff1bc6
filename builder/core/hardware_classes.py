"""Hardware classes: one Celery queue per kind of machine a job can train on, configured by ``QUEUE_HARDWARE``.

A class is a queue name (``gpu``, ``gpu.a100x8``, ``gpu.t4``, ``cpu``), the hardware profile of its workers' devices
(a key of ``workers.engine.hardware.PROFILES``) and how many of those devices one worker of the class has:

    QUEUE_HARDWARE=gpu.a100x8=a100-80gb:8,gpu.t4=t4,cpu=cpu

Without a count a GPU class has one device and a CPU class one process per core of this machine (torch.distributed's
gloo backend runs one process per core). The ``cpu`` class always exists: it is also the queue of light work (dataset
processing, the reaper), so a list that leaves it out gets ``cpu=cpu``. With no setting at all the classes are
``gpu`` and ``cpu``, both on this machine's CPU (the embedded platform trains without a GPU).

Pure Python apart from ``ImproperlyConfigured`` (settings import it before Django is set up). Every error names the
variable and the item at fault.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

VARIABLE = "QUEUE_HARDWARE"
DEFAULT = {"gpu": "cpu", "cpu": "cpu"}
LIGHT_WORK_QUEUE = "cpu"
# A queue name: lower-case letters, digits, dots, dashes and underscores, starting with a letter or digit (what a
# Celery routing key, a URL and a form value all carry without escaping).
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")


@dataclass(frozen=True)
class HardwareClass:
    """One queue's hardware: ``devices`` devices of profile ``profile`` on every worker that consumes it."""

    name: str
    profile: str
    devices: int

    @property
    def hardware(self) -> Any:
        """The ``HardwareProfile`` of its devices as ``PROFILES`` names it: kind and name, no database read (the
        status page's live table renders in an async consumer)."""
        from workers.engine.hardware import get_profile

        return get_profile(self.profile)

    @property
    def machine(self) -> Any:
        """The same profile as the machines that train describe it: a CPU's with the RAM, bf16 units and rates of
        the live CPU workers that consume this class's queue (``builder.core.profiles``; reads the database), so a
        launch check is of those machines, not of the web host or another class's."""
        from builder.core.profiles import hardware_profile

        return hardware_profile(self.profile, queue=self.name)

    def as_dict(self) -> dict[str, Any]:
        """What ``GET /api/hardware/classes`` lists: device type, count and memory per device (of ``machine``)."""
        profile = self.machine
        return {
            "name": self.name,
            "profile": self.profile,
            "device_type": "cuda" if profile.kind == "gpu" else "cpu",
            "device_name": profile.name,
            "devices": self.devices,
            "memory_bytes": profile.memory_bytes,
            "bf16": profile.supports("bf16"),
        }


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_class(name: str, value: str, variable: str = VARIABLE) -> HardwareClass:
    """``("gpu.a100x8", "a100-80gb:8")`` → the class; ``ImproperlyConfigured`` naming ``variable`` otherwise."""
    from workers.engine.hardware import PROFILES  # pure Python, no torch

    item = f"{name}={value}"
    if not _NAME.match(name):
        raise ImproperlyConfigured(
            f"{variable}: {item!r}: a class name is 1-40 lower-case letters, digits, '.', '-' or '_' (e.g. gpu.a100x8)"
        )
    profile, sep, count_text = value.partition(":")
    if profile not in PROFILES:
        raise ImproperlyConfigured(f"{variable}: {item!r}: the profile must be one of {', '.join(sorted(PROFILES))}")
    hardware = PROFILES[profile]
    if not sep:
        devices = _cores() if hardware.kind == "cpu" else 1
    elif not count_text.isdigit() or int(count_text) < 1:
        raise ImproperlyConfigured(f"{variable}: {item!r}: the device count after ':' must be a whole number >= 1")
    else:
        devices = int(count_text)
    if hardware.kind == "gpu" and devices > hardware.max_devices:
        raise ImproperlyConfigured(
            f"{variable}: {item!r}: one worker has at most {hardware.max_devices} {hardware.name} devices"
        )
    return HardwareClass(name=name, profile=profile, devices=devices)


def parse_classes(mapping: dict[str, str], variable: str = VARIABLE) -> dict[str, str]:
    """``{"gpu.t4": "t4", "cpu": "cpu"}`` (``builder.env.env_pairs``) checked item by item (``parse_class``), in the
    order given, with ``cpu`` added when missing. The values stay as written (``profile[:count]``): settings keep
    the mapping as ``QUEUE_HARDWARE`` and ``classes()`` reads it."""
    for name, value in mapping.items():
        parse_class(name, value, variable)
    if not mapping:
        raise ImproperlyConfigured(f"{variable} lists no hardware class")
    return {**mapping, LIGHT_WORK_QUEUE: mapping.get(LIGHT_WORK_QUEUE, "cpu")}


def default_class_name(mapping: dict[str, str], chosen: str = "", variable: str = "JOBS_DEFAULT_QUEUE") -> str:
    """The class a launch gets when it names none: ``chosen`` (which must be a class), else ``gpu`` when there is
    one, else the first class listed."""
    if chosen:
        if chosen not in mapping:
            raise ImproperlyConfigured(f"{variable}={chosen!r} is not a hardware class; classes: {', '.join(mapping)}")
        return chosen
    return "gpu" if "gpu" in mapping else next(iter(mapping))


def classes() -> dict[str, HardwareClass]:
    """The configured classes by name (from ``settings.QUEUE_HARDWARE``: tests may replace it)."""
    from django.conf import settings

    return {name: parse_class(name, value) for name, value in settings.QUEUE_HARDWARE.items()}


def get_class(name: str) -> HardwareClass | None:
    return classes().get(name)


def default_class() -> str:
    from django.conf import settings

    mapping: dict[str, str] = settings.QUEUE_HARDWARE
    preferred = getattr(settings, "JOBS_DEFAULT_QUEUE", "")
    return preferred if preferred in mapping else default_class_name(mapping)


def queue_classes(queues: list[str]) -> list[dict[str, str]]:
    """Each of ``queues`` with the devices its hardware class (``QUEUE_HARDWARE``) trains on, as the workers page
    and a job's dashboard show them: ``{"queue": "gpu", "device_type": "cpu", "devices": "on CPU"}``. A queue's
    name says nothing of its devices: with no setting the default class is called ``gpu`` and trains on the CPU,
    so a CPU-only worker consumes a queue named gpu. A queue no class names has device_type ``none``."""
    known = classes()
    labelled = []
    for name in queues:
        wanted = known.get(name)
        if wanted is None:
            labelled.append({"queue": name, "device_type": "none", "devices": "not a hardware class"})
            continue
        hardware = wanted.hardware  # the nominal profile: this runs in the status page's async consumer too
        cpu = hardware.kind == "cpu"
        devices = "on CPU" if cpu else f"on {wanted.devices} × {hardware.name}"
        labelled.append({"queue": name, "device_type": "cpu" if cpu else "cuda", "devices": devices})
    return labelled
