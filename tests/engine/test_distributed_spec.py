"""``training.distributed``: its rules name the field to change, and the estimator predicts what it runs."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
from pydantic import ValidationError

from workers.engine.estimate import estimate, estimate_memory, estimate_time
from workers.engine.hardware import get_profile
from workers.engine.spec import Spec, _distributed_problems, load_spec, spec_errors


def _spec(training: dict[str, Any], moe: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": {"moe": moe or {"num_routed_experts": 8, "top_k": 2}}, "training": training}


def _paths(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        load_spec(raw)
    return [e["path"] for e in spec_errors(info.value)]


# (id, bad raw spec, path named, a nearby good raw spec)
RULES = [
    (
        "devices_divide_the_batch",
        _spec({"batch_size": 6, "distributed": {"devices": 4}}),
        "training.distributed.devices",
        _spec({"batch_size": 8, "distributed": {"devices": 4}}),
    ),
    (
        "experts_divide_over_devices",
        _spec({"batch_size": 6, "distributed": {"devices": 3, "expert_parallel": True}}),
        "training.distributed.expert_parallel",
        _spec({"batch_size": 6, "distributed": {"devices": 3, "expert_parallel": False}}),
    ),
    (
        "expert_parallel_runs_with_ddp",
        _spec({"distributed": {"devices": 2, "strategy": "fsdp", "expert_parallel": True}}),
        "training.distributed.expert_parallel",
        _spec({"distributed": {"devices": 2, "strategy": "ddp", "expert_parallel": True}}),
    ),
    (
        "expert_parallel_is_not_for_fp16",
        _spec({"distributed": {"devices": 2, "expert_parallel": True}, "precision": "fp16"}),
        "training.distributed.expert_parallel",
        _spec({"distributed": {"devices": 2, "expert_parallel": True}, "precision": "bf16"}),
    ),
    (
        "fsdp_is_not_for_muon",
        _spec({"distributed": {"devices": 2, "strategy": "fsdp"}, "optimizer": {"name": "muon"}}),
        "training.distributed.strategy",
        _spec({"distributed": {"devices": 2, "strategy": "ddp"}, "optimizer": {"name": "muon"}}),
    ),
    (
        "fsdp_is_not_for_fp16",
        _spec({"distributed": {"devices": 2, "strategy": "fsdp"}, "precision": "fp16"}),
        "training.distributed.strategy",
        _spec({"distributed": {"devices": 2, "strategy": "fsdp"}, "precision": "bf16"}),
    ),
]


def test_every_distributed_rule_has_a_case() -> None:
    assert len(RULES) == inspect.getsource(_distributed_problems).count("out.append(")


@pytest.mark.parametrize(("bad", "path", "good"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_a_distributed_rule_names_its_field_and_a_nearby_spec_passes(
    bad: dict[str, Any], path: str, good: dict[str, Any]
) -> None:
    assert _paths(bad) == [path]
    load_spec(good)


def test_the_defaults_are_one_device_ddp_and_the_fields_are_strict() -> None:
    dist = Spec().training.distributed
    assert (dist.devices, dist.strategy, dist.expert_parallel) == (1, "ddp", False)
    assert _paths(_spec({"distributed": {"devices": "2"}})) == ["training.distributed.devices"]
    assert _paths(_spec({"distributed": {"expert_parallel": 1}})) == ["training.distributed.expert_parallel"]
    assert _paths(_spec({"distributed": {"strategy": "zero3"}})) == ["training.distributed.strategy"]
    assert _paths(_spec({"distributed": {"devices": 0}})) == ["training.distributed.devices"]
    assert _paths(_spec({"distributed": {"nodes": 2}})) == ["training.distributed.nodes"]


def test_the_estimator_predicts_the_layout_the_spec_runs() -> None:
    """Without num_gpus/parallelism the estimate is of the spec's own devices and strategy; batch_size is the
    global micro-batch, so more devices means fewer activations each and the same tokens per step."""
    a100 = get_profile("a100-80gb")
    one = load_spec(_spec({"batch_size": 8}))
    two = load_spec(_spec({"batch_size": 8, "distributed": {"devices": 2}}))
    fsdp = load_spec(_spec({"batch_size": 8, "distributed": {"devices": 2, "strategy": "fsdp"}}))
    ep = load_spec(_spec({"batch_size": 8, "distributed": {"devices": 2, "expert_parallel": True}}))

    assert estimate(two, a100).num_gpus == 2 and estimate(two, a100).parallelism == "ddp"
    assert estimate(fsdp, a100).parallelism == "fsdp" and estimate(ep, a100).parallelism == "expert"
    # Asking explicitly gives the same figures as the spec's defaults.
    assert estimate_memory(two, a100) == estimate_memory(one, a100, num_gpus=2, parallelism="ddp")
    assert estimate_time(ep, a100) == estimate_time(one, a100, num_gpus=2, parallelism="expert")

    m1, m2, mf, me = (estimate_memory(s, a100) for s in (one, two, fsdp, ep))
    assert m2.activations < m1.activations and m2.weights == m1.weights and m2.optimizer == m1.optimizer
    # FSDP shards the optimizer state and (but for one gathered block) weights and gradients.
    assert mf.optimizer * 2 == pytest.approx(m2.optimizer, rel=1e-6)
    assert mf.weights < m2.weights and mf.gradients < m2.gradients and mf.peak < m2.peak
    # Expert parallelism holds half the routed experts.
    assert me.weights < m2.weights and m2.optimizer > me.optimizer > mf.optimizer
    assert estimate_time(two, a100).tokens_per_step == estimate_time(one, a100).tokens_per_step


def test_processes_on_a_cpu_share_its_cores() -> None:
    cpu = dataclasses.replace(get_profile("cpu"), max_devices=2)  # whatever this machine's core count
    one = load_spec(_spec({"batch_size": 8}))
    two = load_spec(_spec({"batch_size": 8, "distributed": {"devices": 2}}))
    # Half the batch each on half the machine each, and every process steps the whole optimizer: no faster than
    # one process (communication aside), and not much slower.
    t1, t2 = estimate_time(one, cpu).step_seconds, estimate_time(two, cpu).step_seconds
    assert t1 <= t2 < 1.25 * t1
