"""The CPU probe (``workers.engine.probe``) and what the estimator does with its rates: a profile built from
measured rates (``cpu_profile(rates=...)``) and the dropout term of the step time. Whether the probed estimate is
close to the measured step is ``python -m bench.estimates``' question, not a test's."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from builder.configs.presets import PRESETS
from tests.engine.specs import merged_spec
from workers.engine.estimate import dropout_elements_per_token, estimate_time
from workers.engine.hardware import BF16_SPEEDUP_AMX, CpuRates, cpu_profile
from workers.engine.probe import measure_cpu_rates

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py

AMX = frozenset({"amx_bf16", "amx_tile", "avx512_bf16"})
RATES = CpuRates(
    matmul_flops=2.5e11, layer_seconds=3e-3, copy_bytes_per_s=1.3e10, dropout_seconds_per_element=8e-9, threads=3
)


def test_the_probe_measures_every_rate_on_the_threads_torch_uses() -> None:
    rates = measure_cpu_rates(repeats=3)
    assert rates.threads == torch.get_num_threads() == 1
    # Bounds a CPU of the last 20 years falls within, loaded or not; a unit slip (ms for s, bits for bytes,
    # FLOPs per matmul miscounted by 1024) falls outside.
    assert 1e9 < rates.matmul_flops < 1e14
    assert 1e-5 < rates.layer_seconds < 1.0
    assert 1e8 < rates.copy_bytes_per_s < 1e12
    assert 1e-11 < rates.dropout_seconds_per_element < 1e-6
    assert CpuRates.from_dict(rates.as_dict()) == rates


@pytest.mark.parametrize(
    ("field", "value"),
    [("matmul_flops", None), ("layer_seconds", -1.0), ("copy_bytes_per_s", math.nan), ("matmul_flops", True),
     ("dropout_seconds_per_element", math.inf), ("threads", 0), ("threads", 2.5)],
)  # fmt: skip
def test_rates_from_a_worker_are_checked_field_by_field(field: str, value: Any) -> None:
    raw = {**RATES.as_dict(), field: value}
    with pytest.raises(ValueError, match=f"^{field}: expected a positive"):
        CpuRates.from_dict(raw)


def test_measured_rates_replace_the_reference_figures_of_the_cpu_profile() -> None:
    reference, measured = cpu_profile(AMX, cores=2), cpu_profile(AMX, rates=RATES)
    assert measured.peak_flops["fp32"] == 2.5e11 and measured.peak_flops["bf16"] == 2.5e11 * BF16_SPEEDUP_AMX
    assert measured.layer_overhead_seconds == 3e-3 and measured.bandwidth_bytes_per_s == 1.3e10
    assert measured.dropout_seconds_per_element == 8e-9
    assert measured.max_devices == 3 and measured.name == "This CPU (3 cores)"  # the worker's threads
    assert "Measured by its workers (3 threads): 250 GFLOP/s fp32 matmul" in measured.notes
    assert "reference machine" in reference.notes
    # What stays: the fitted shares of the peak, and the machine's memory.
    assert (measured.efficiency, measured.full_speed_width) == (reference.efficiency, reference.full_speed_width)


def test_a_slower_measured_cpu_predicts_a_longer_step_in_every_term() -> None:
    spec = PRESETS["text-classifier"].spec
    fast = cpu_profile(rates=RATES)
    slow = cpu_profile(
        rates=dataclasses.replace(
            RATES,
            matmul_flops=RATES.matmul_flops / 2,
            layer_seconds=RATES.layer_seconds * 2,
            copy_bytes_per_s=RATES.copy_bytes_per_s / 2,
            dropout_seconds_per_element=RATES.dropout_seconds_per_element * 2,
        )
    )
    quick, slowed = estimate_time(spec, fast), estimate_time(spec, slow)
    # Every term scales with its rate, so halving every rate doubles the step (up to Muon-free rounding).
    assert slowed.compute_seconds == pytest.approx(2 * quick.compute_seconds)
    assert slowed.memory_seconds == pytest.approx(2 * quick.memory_seconds)


def test_dropout_adds_the_time_of_drawing_its_masks() -> None:
    base = PRESETS["text-classifier"].spec.model_dump(mode="json")
    without = merged_spec(base, model={"dropout": 0.0})
    residual = merged_spec(base, model={"dropout": 0.1})
    both = merged_spec(base, model={"dropout": 0.1, "attention_dropout": 0.1})
    m, T = residual.model, residual.data.seq_len
    # The embedding's dropout and two per block (hidden_size each); attention dropout: heads x seq_len per block.
    assert dropout_elements_per_token(without) == 0
    assert dropout_elements_per_token(residual) == m.hidden_size * (1 + 2 * m.num_layers)
    assert dropout_elements_per_token(both) == dropout_elements_per_token(residual) + m.num_heads * T * m.num_layers
    profile = cpu_profile(rates=RATES)
    tokens = residual.training.batch_size * T
    added = estimate_time(residual, profile).memory_seconds - estimate_time(without, profile).memory_seconds
    expected_dropout = 8e-9 * dropout_elements_per_token(residual) * tokens
    # The rest of the difference is the masks' dispatch and saved bytes, which dropout also adds.
    assert expected_dropout <= added < expected_dropout * 1.5
    assert estimate_time(without, profile).compute_seconds == estimate_time(residual, profile).compute_seconds


def test_a_cpu_worker_advertises_its_measured_rates_or_why_it_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.engine import devices, probe

    found = devices.describe_devices()
    assert found["device_type"] == "cpu" and found["rates_error"] is None
    assert CpuRates.from_dict(found["rates"]).threads == torch.get_num_threads()

    def broken(repeats: int = 15) -> CpuRates:
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(probe, "measure_cpu_rates", broken)
    failed = devices.describe_devices()
    assert failed["rates"] is None and failed["rates_error"] == "RuntimeError: no oneDNN here"
    assert failed["device_type"] == "cpu"  # the worker still advertises its devices


def test_the_faster_of_two_measurements_is_kept_rate_by_rate() -> None:
    slow = CpuRates(1e11, 5e-3, 2e10, 6e-9, 3)
    best = RATES.best(slow)
    assert best == CpuRates(2.5e11, 3e-3, 2e10, 6e-9, 3)
    assert slow.best(RATES) == best


def test_probes_on_one_machine_take_turns(tmp_path: Any) -> None:
    from workers.engine.devices import _one_probe_at_a_time

    lock = tmp_path / "probe.lock"
    with _one_probe_at_a_time(lock) as first:
        assert first
        with _one_probe_at_a_time(lock, wait_s=0.2) as second:  # (flock: a second open file description waits)
            assert not second  # gave up waiting: it probes anyway, and says so
    with _one_probe_at_a_time(lock, wait_s=0.2) as third:
        assert third  # released
