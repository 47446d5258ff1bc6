"""Estimates for the CPU take the rates its live workers measured (``workers.engine.probe``, advertised with their
devices; ``builder.core.profiles``): the estimate API and panel, the hardware list and the workers page show them;
a stopped or silent worker's rates, or rates that do not parse, do not count."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from builder.core.profiles import hardware_profile
from builder.fleet.models import Worker
from builder.fleet.registry import live_cpu_workers
from tests.builder.test_configs_api import TINY
from tests.conftest import signed_in
from workers.engine.estimate import estimate_time
from workers.engine.hardware import PROFILES, CpuRates, cpu_profile
from workers.engine.spec import load_spec

pytestmark = pytest.mark.django_db

RATES = CpuRates(
    matmul_flops=1.25e11, layer_seconds=4e-3, copy_bytes_per_s=1e10, dropout_seconds_per_element=9e-9, threads=2
)
CPU = {"device_type": "cpu", "count": 2, "name": "Intel Xeon", "memory_bytes": 25 * 2**30, "bf16": False}


def _worker(
    name: str,
    rates: Any,
    age_s: float = 0.5,
    stopped: bool = False,
    kind: str = "cpu",
    queues: tuple[str, ...] = ("cpu",),
) -> Worker:
    at = timezone.now() - timedelta(seconds=age_s)
    hardware = {**CPU, "device_type": kind, "rates": rates}
    return Worker.objects.create(
        name=name, pid=1, queues=list(queues), hardware=hardware, started_at=at, heartbeat_at=at,
        stopped_at=at if stopped else None,
    )  # fmt: skip


def live_cpu_rates() -> CpuRates | None:
    workers = live_cpu_workers()
    return workers.rates if workers is not None else None


def _step_seconds(client: APIClient) -> float:
    response = client.post("/api/specs/estimate", {"spec": TINY, "hardware": "cpu"}, format="json")
    assert response.status_code == 200
    return float(response.json()["estimate"]["time"]["step_seconds"])


def _panel(user: Any) -> str:
    response = signed_in(user).post("/configure/estimate/", {"spec": json.dumps(TINY), "hw": "cpu", "gpus": ""})
    assert response.status_code == 200
    return response.content.decode()


def test_a_live_workers_measured_rates_are_what_the_cpu_estimates_use(alice: Any) -> None:
    client = signed_in(alice, APIClient)
    spec = load_spec(TINY)
    reference = estimate_time(spec, PROFILES["cpu"]).step_seconds
    assert _step_seconds(client) == pytest.approx(reference)  # no worker yet: the reference machine's figures
    assert "reference machine" in {h["key"]: h for h in client.get("/api/hardware").json()}["cpu"]["notes"]
    assert 'data-testid="measured-rates"' not in _panel(alice)

    _worker("cpu@measured", RATES.as_dict())
    measured = estimate_time(spec, cpu_profile(rates=RATES)).step_seconds
    assert measured != pytest.approx(reference)
    assert _step_seconds(client) == pytest.approx(measured)
    cpu = {h["key"]: h for h in client.get("/api/hardware").json()}["cpu"]
    assert cpu["peak_flops"]["fp32"] == 1.25e11 and cpu["layer_overhead_seconds"] == 4e-3
    assert cpu["notes"].startswith("Measured by its workers (2 threads): 125 GFLOP/s fp32 matmul")
    # The estimate panel says where its uncalibrated figures come from, with the rates on hover.
    panel = _panel(alice)
    assert "uncalibrated, at the rates its workers measured of" in panel
    assert 'title="Measured by its workers (2 threads): 125 GFLOP/s fp32 matmul' in panel
    assert hardware_profile("t4") is PROFILES["t4"]  # a GPU profile is untouched


def test_only_live_cpu_workers_with_valid_rates_count_and_several_give_the_median() -> None:
    assert live_cpu_rates() is None
    _worker("cpu@stopped", {**RATES.as_dict(), "matmul_flops": 1e9}, stopped=True)
    _worker("cpu@silent", {**RATES.as_dict(), "matmul_flops": 1e9}, age_s=3600)
    _worker("cpu@older", None)  # a worker from before the probe, or whose probe failed
    _worker("cpu@broken", {**RATES.as_dict(), "layer_seconds": -1})
    _worker("gpu@cuda", {**RATES.as_dict(), "matmul_flops": 1e9}, kind="cuda")
    assert live_cpu_rates() is None
    cpu = hardware_profile("cpu")  # the live workers' RAM, the reference machine's rates
    assert cpu.peak_flops["fp32"] == PROFILES["cpu"].peak_flops["fp32"] and cpu.memory_bytes == CPU["memory_bytes"]

    _worker("cpu@a", RATES.as_dict())
    _worker("cpu@b", {**RATES.as_dict(), "matmul_flops": 2e11, "threads": 4})
    _worker("cpu@c", {**RATES.as_dict(), "matmul_flops": 3e11, "layer_seconds": 1e-3, "threads": 4})
    median = live_cpu_rates()
    assert median is not None
    assert (median.matmul_flops, median.layer_seconds, median.threads) == (2e11, 4e-3, 4)


def test_the_workers_page_shows_the_measured_matmul_rate_or_why_there_is_none(alice: Any) -> None:
    _worker("cpu@measured", RATES.as_dict())
    failed = _worker("cpu@failed", None)
    failed.hardware = {**failed.hardware, "rates_error": "RuntimeError: no oneDNN"}
    failed.save()
    page = signed_in(alice).get("/workers/").content.decode()
    assert "2 cores of Intel Xeon (cpu), 25.0 GiB RAM; measured 125 GFLOP/s fp32 matmul" in page
    assert "its CPU could not be measured (RuntimeError: no oneDNN)" in page


def test_an_idle_worker_measures_again_and_keeps_the_faster_rates(monkeypatch: pytest.MonkeyPatch, alice: Any) -> None:
    from builder.fleet import registry
    from builder.jobs.models import Job, JobState
    from tests.builder.test_jobs import tiny_spec

    slow = RATES.as_dict()  # measured beside another worker's probe
    faster = {**RATES.as_dict(), "matmul_flops": 2.6e11, "layer_seconds": 2e-3, "copy_bytes_per_s": 5e9}
    worker = _worker("cpu@refresh", slow)
    presence = registry.Presence("cpu@refresh", 1, ["cpu"])
    presence.hardware = dict(worker.hardware)
    probes: list[int] = []

    def detect() -> dict[str, Any]:
        probes.append(1)
        return {**CPU, "rates": faster}

    monkeypatch.setattr(registry, "detect_hardware", detect)
    assert presence.refresh_rates()
    rates = Worker.objects.get(name="cpu@refresh").hardware["rates"]
    # The faster of each: the new matmul and dispatch, the old (faster) copy.
    assert (rates["matmul_flops"], rates["layer_seconds"], rates["copy_bytes_per_s"]) == (2.6e11, 2e-3, 1e10)
    assert live_cpu_rates() == CpuRates.from_dict(rates)

    # A failed probe changes nothing; a worker that holds a running job is not probed at all.
    monkeypatch.setattr(registry, "detect_hardware", lambda: {**CPU, "rates": None, "rates_error": "boom"})
    assert presence.refresh_rates() and Worker.objects.get(name="cpu@refresh").hardware["rates"] == rates
    monkeypatch.setattr(registry, "detect_hardware", detect)
    Job.objects.create(
        owner=alice, name="busy", spec=tiny_spec(5), data_source="d.txt", queue="cpu", state=JobState.RUNNING,
        lease_owner="cpu@refresh:4242", lease_token=1, heartbeat_at=timezone.now(),
    )  # fmt: skip
    assert presence.refresh_rates() and len(probes) == 1


def _calibration(owner: Any, spec: Any, measured: float, factor: float, **fields: Any) -> Any:
    from builder.configs.models import HardwareCalibration
    from builder.core.durable import WorkState

    return HardwareCalibration.objects.create(
        requested_by=owner, spec=spec, steps=3, state=WorkState.SUCCEEDED, hardware="cpu", device_name="cpu",
        measured_step_seconds=measured, predicted_step_seconds=measured / factor, factor=factor,
        finished_at=timezone.now(), **fields,
    )  # fmt: skip


def test_a_calibration_corrects_todays_prediction_not_the_one_of_its_day(alice: Any) -> None:
    """A calibration recorded against the reference figures, applied after a worker measured faster rates, still
    makes the estimate its measured step: the factor is measured over the prediction now, not the stored one."""
    from builder.configs.services import calibration_factor

    client = signed_in(alice, APIClient)
    spec = load_spec(TINY)
    reference = estimate_time(spec, PROFILES["cpu"]).step_seconds
    measured = 1.5 * reference
    _calibration(alice, TINY, measured, factor=1.5)  # what the worker recorded before any rates were measured
    assert calibration_factor(PROFILES["cpu"]) == pytest.approx(1.5)
    assert _step_seconds(client) == pytest.approx(measured)

    _worker("cpu@measured", RATES.as_dict())  # predictions move: RATES' matmul is a third of the reference's
    probed = estimate_time(spec, cpu_profile(rates=RATES)).step_seconds
    assert probed > 1.2 * reference
    assert calibration_factor(hardware_profile("cpu")) == pytest.approx(measured / probed)
    # The stored factor (1.5) applied to the new prediction would say 1.5 x probed; the step took `measured`.
    assert _step_seconds(client) == pytest.approx(measured)
    assert {h["key"]: h for h in client.get("/api/hardware").json()}["cpu"]["calibration_factor"] == pytest.approx(
        measured / probed
    )

    # Of several, the median; a row whose spec no longer validates (an older schema) is left out, not a 500.
    _calibration(alice, TINY, 3 * measured, factor=4.5)
    _calibration(alice, TINY, 2 * measured, factor=3.0)
    _calibration(alice, {"model": {"top_k": "two"}}, 100 * measured, factor=150.0)
    assert calibration_factor(hardware_profile("cpu")) == pytest.approx(2 * measured / probed)
    assert calibration_factor(PROFILES["t4"]) == 1.0  # another profile's calibrations are not its own


def _advertising(
    name: str, memory_bytes: int, units: list[str], bf16: bool = True, queues: tuple[str, ...] = ("cpu",)
) -> Worker:
    worker = _worker(name, RATES.as_dict(), queues=queues)
    worker.hardware = {**worker.hardware, "memory_bytes": memory_bytes, "bf16": bf16, "bf16_units": units}
    worker.save()
    return worker


def _proposed_precision() -> str:
    from builder.configs.forms import WizardForm
    from builder.configs.wizard import propose
    from tests.builder.test_configs_wizard import ANSWERS

    form = WizardForm({**ANSWERS, "context": "short"}, step=4)
    assert form.is_valid(), form.errors
    return propose(form.answers()).spec.training.precision


def test_the_cpu_profile_has_the_workers_bf16_units_and_ram_not_the_web_hosts(alice: Any) -> None:
    """On hosts that share only the database the web tier's own CPU trains nothing: bf16 is offered when every live
    CPU worker multiplies it natively, and the memory checks are of the smallest worker's RAM."""
    from builder.core import hardware_classes
    from builder.core.errors import Refusal
    from builder.jobs.submit import check_fits
    from tests.builder.test_jobs import tiny_spec
    from workers.engine.estimate import estimate
    from workers.engine.hardware import BF16_SPEEDUP_AMX

    client = signed_in(alice, APIClient)
    # A worker without native bf16 (this host may have it: its own flags no longer decide).
    plain = _advertising("cpu@avx2", 48 * 2**30, [], bf16=False)
    assert not hardware_profile("cpu").supports("bf16") and _proposed_precision() == "fp32"
    assert hardware_profile("cpu").memory_bytes == 48 * 2**30

    # Workers that multiply bf16 natively: offered, at the AMX rate over their measured fp32 matmul.
    plain.stopped_at = timezone.now()
    plain.save()
    _advertising("cpu@amx1", 64 * 2**30, ["AMX", "AVX-512 BF16"])
    _advertising("cpu@amx2", 32 * 2**30, ["AVX-512 BF16", "AMX", "a unit nobody knows"])
    cpu = hardware_profile("cpu")
    assert cpu.supports("bf16") and cpu.peak_flops["bf16"] == pytest.approx(RATES.matmul_flops * BF16_SPEEDUP_AMX)
    assert cpu.memory_bytes == 32 * 2**30 and "bf16 through AMX and AVX-512 BF16" in cpu.notes
    listed = {h["key"]: h for h in client.get("/api/hardware").json()}["cpu"]
    assert listed["peak_flops"]["bf16"] == pytest.approx(cpu.peak_flops["bf16"])
    assert listed["memory_bytes"] == 32 * 2**30
    assert _proposed_precision() == "bf16"  # the wizard proposes what the workers run natively
    classes = {c["name"]: c for c in client.get("/api/hardware/classes").json()}
    assert classes["cpu"]["bf16"] is True and classes["cpu"]["memory_bytes"] == 32 * 2**30

    # One live worker with AVX-512 BF16 only: the units all of them have; oneDNN saying no on one: none.
    _advertising("cpu@avx512", 40 * 2**30, ["AVX-512 BF16"])
    cpu = hardware_profile("cpu")
    assert cpu.supports("bf16") and "bf16 through AVX-512 BF16;" in cpu.notes
    _advertising("cpu@no-onednn", 40 * 2**30, ["AMX", "AVX-512 BF16"], bf16=False)
    assert not hardware_profile("cpu").supports("bf16") and _proposed_precision() == "fp32"

    # The launch check is of the smallest live worker's RAM: a spec that fits 32 GiB is refused on 64 MiB.
    spec = tiny_spec(5, batch_size=8)
    peak = estimate(load_spec(spec), hardware_profile("cpu")).memory.peak
    check_fits(spec, "cpu")
    _advertising("cpu@small", peak // 2, [])
    assert hardware_classes.get_class("cpu") is not None
    assert hardware_classes.get_class("cpu").machine.memory_bytes == peak // 2  # type: ignore[union-attr]
    with pytest.raises(Refusal) as refused:
        check_fits(spec, "cpu")
    ((field, message),) = [(e.path, e.message) for e in refused.value.errors]
    assert field == "spec" and message.startswith("it cannot train on the cpu class's hardware")


def test_a_cpu_class_is_judged_on_the_workers_that_consume_its_queue(settings: Any) -> None:
    """Two CPU classes on different machines: a job for the big one is checked against the big machines' RAM, not
    the smallest worker's; a class that no live worker consumes is judged on all of them."""
    from builder.core import hardware_classes
    from builder.core.errors import Refusal
    from builder.jobs.submit import check_fits
    from tests.builder.test_jobs import tiny_spec
    from workers.engine.estimate import estimate

    settings.QUEUE_HARDWARE = {"cpu": "cpu", "cpu.big": "cpu", "cpu.new": "cpu"}
    spec = tiny_spec(5, batch_size=8)
    peak = estimate(load_spec(spec), PROFILES["cpu"]).memory.peak
    _advertising("cpu@small", peak // 2, [], queues=("cpu",))
    _advertising("cpu@big", 256 * 2**30, ["AMX"], queues=("cpu.big",))
    machines = {name: c.machine for name, c in hardware_classes.classes().items()}
    assert machines["cpu"].memory_bytes == peak // 2 and not machines["cpu"].supports("bf16")
    assert machines["cpu.big"].memory_bytes == 256 * 2**30 and machines["cpu.big"].supports("bf16")
    assert machines["cpu.new"].memory_bytes == peak // 2  # nobody consumes it yet: all live CPU workers
    assert hardware_profile("cpu").memory_bytes == peak // 2  # an estimate without a queue: all of them
    check_fits(spec, "cpu.big")
    with pytest.raises(Refusal):
        check_fits(spec, "cpu")
