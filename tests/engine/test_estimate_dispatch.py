"""The step-time model's dispatch term (``workers.engine.estimate.dispatch_operations``) and its structure: calls
counted from the spec match the aten calls a built model issues, and grow where the model issues more of them.
Speed itself is measured by ``python -m bench.estimates``, not asserted here."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from builder.configs.presets import PRESETS
from tests.engine.specs import merged_spec
from workers.engine.estimate import (
    _DROPOUT_OPS,
    _REFERENCE_LAYER_OPS,
    dispatch_operations,
    estimate_time,
    matmul_efficiency,
)
from workers.engine.hardware import CPU, get_profile
from workers.engine.model import build_model
from workers.engine.spec import Spec

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py

TINY = PRESETS["tiny-cpu-demo"].spec.model_dump(mode="json")
MUON = {"name": "muon", "lr": 0.002, "weight_decay": 0.01, "adamw_lr": 0.002, "adamw_weight_decay": 0.01}


def tiny(**sections: dict[str, Any]) -> Spec:
    return merged_spec(TINY, **sections)


class _Calls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def counted_calls(spec: Spec) -> int:
    """Aten calls of one micro-batch's forward and backward of ``build_model(spec)``."""
    torch.manual_seed(0)
    model = build_model(spec)
    B, T = spec.training.batch_size, spec.data.seq_len
    ids = torch.randint(0, spec.model.vocab_size, (B, T))
    calls = _Calls()
    with calls:
        out = model(ids, labels=ids, return_logits=False)  # as a training step calls it
        assert out.loss is not None
        out.loss.backward()
    return calls.count


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"num_layers": 4},
        {"moe": {"num_shared_experts": 0}},
        {"moe": {"first_dense_layers": 0}},
        {"attention": "mla"},
        {"activation": "gelu"},
        {"norm": "layernorm"},
        {"vocab_size": 8192},
    ],
    ids=["template", "4-layers", "no-shared", "all-moe", "mla", "gelu", "layernorm", "vocab-8192"],
)
def test_counted_calls_match_the_model(changes: dict[str, Any]) -> None:
    """The spec-side count is within 10% of the calls the built model issues (it is a cost model: the calls of a
    kind are counted once, on the tiny demo, and added per part)."""
    spec = tiny(model=changes, training={"batch_size": 4})
    assert dispatch_operations(spec).micro_batch == pytest.approx(counted_calls(spec), rel=0.10)


def test_dispatch_grows_with_layers_and_with_the_loss_chunks_but_not_with_routed_experts() -> None:
    base = dispatch_operations(tiny())
    deeper = dispatch_operations(tiny(model={"num_layers": 6}))
    per_layer = _REFERENCE_LAYER_OPS + (_DROPOUT_OPS if TINY["model"]["dropout"] > 0 else 0)  # the template's 0.1
    assert deeper.micro_batch - base.micro_batch == pytest.approx(4 * per_layer)
    assert deeper.step > base.step  # more parameter tensors for the optimizer to walk
    # Routed experts run as one grouped matmul: 16 experts issue the calls 4 do, their cost is elsewhere.
    many = dispatch_operations(tiny(model={"moe": {"num_routed_experts": 16}}))
    assert many == base
    # A bigger micro-batch splits the fused loss into more chunks.
    assert dispatch_operations(tiny(training={"batch_size": 32})).micro_batch > base.micro_batch
    assert (
        estimate_time(tiny(model={"moe": {"num_routed_experts": 16}}), CPU).step_seconds
        > estimate_time(tiny(), CPU).step_seconds
    )


def test_muon_costs_more_than_adamw() -> None:
    raw = tiny().model_dump(mode="json")
    raw["training"]["optimizer"] = MUON  # replaced, not merged: Muon takes none of AdamW's fields
    adamw, muon = tiny(), Spec.model_validate(raw)
    assert dispatch_operations(muon).step > 2 * dispatch_operations(adamw).step  # per-matrix Newton-Schulz calls
    assert dispatch_operations(muon).micro_batch == dispatch_operations(adamw).micro_batch
    fast, slow = estimate_time(adamw, CPU), estimate_time(muon, CPU)
    assert slow.step_seconds > fast.step_seconds
    assert slow.memory_seconds > fast.memory_seconds  # its dispatch, not only its Newton-Schulz FLOPs


def test_the_tiny_demo_estimate_is_not_under_its_dispatch_floor() -> None:
    """Uncalibrated, the tiny demo's step is at least its dispatched calls at the profile's cost per call, and that
    floor is a visible part of it (what the estimate left out when it was ~2x optimistic)."""
    spec = PRESETS["tiny-cpu-demo"].spec
    ops = dispatch_operations(spec)
    floor = CPU.layer_overhead_seconds / _REFERENCE_LAYER_OPS * (ops.micro_batch + ops.step)
    step = estimate_time(spec, CPU)
    assert step.step_seconds > floor
    assert floor > 0.05 * step.step_seconds
    # The floor is a per-call cost: accumulation repeats the micro-batch's calls, not the optimizer's.
    accum = merged_spec(spec.model_dump(mode="json"), training={"grad_accum_steps": 2, "batch_size": 4})
    single = merged_spec(spec.model_dump(mode="json"), training={"batch_size": 4})
    extra = estimate_time(accum, CPU).step_seconds - 2 * estimate_time(single, CPU).step_seconds
    assert extra < 0  # two micro-batches share one optimizer step


def test_narrow_models_reach_less_of_the_matmul_peak() -> None:
    narrow, wide = tiny(), PRESETS["small-moe"].spec
    assert CPU.full_speed_width > 0
    assert matmul_efficiency(narrow, CPU) < matmul_efficiency(wide, CPU) == CPU.efficiency
    gpu = get_profile("a100-80gb")  # not measured there: no width dependence
    assert matmul_efficiency(narrow, gpu) == gpu.efficiency
    flat = dataclasses.replace(CPU, full_speed_width=0)
    assert estimate_time(narrow, CPU).compute_seconds > estimate_time(narrow, flat).compute_seconds


def test_gpu_launches_keep_their_per_block_floor() -> None:
    """On a GPU the calls are launched asynchronously: the estimate keeps one floor per block, so a chunked loss
    or the optimizer's walk over tensors adds no dispatch time there; on a CPU every call counts."""
    spec = tiny(model={"vocab_size": 8192}, training={"batch_size": 32})
    more = 0.001  # seconds more per reference layer's worth of calls

    def dispatch_share(profile: Any) -> float:
        slower = dataclasses.replace(profile, layer_overhead_seconds=profile.layer_overhead_seconds + more)
        return estimate_time(spec, slower).memory_seconds - estimate_time(spec, profile).memory_seconds

    assert dispatch_share(get_profile("a100-80gb")) == pytest.approx(spec.model.num_layers * more)
    ops = dispatch_operations(spec)
    assert dispatch_share(CPU) == pytest.approx(more / _REFERENCE_LAYER_OPS * (ops.micro_batch + ops.step))
    assert dispatch_share(CPU) > spec.model.num_layers * more
