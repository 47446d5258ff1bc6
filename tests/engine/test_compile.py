"""``training.compile``: the compiled model computes what the eager one does, and runs resume across the switch.

Compiling is slow on this CPU (tens of seconds a model): the module compiles two models in all, and the
second compile of a shape hits Inductor's on-disk cache.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.engine.specs import merged, merged_spec
from tests.engine.tiny import TINY, write_letters_corpus
from workers.engine.data import PreparedData, prepare
from workers.engine.estimate import estimate_compile_seconds, estimate_time
from workers.engine.hardware import PROFILES
from workers.engine.kernels import count_per_expert, grouped_matmul
from workers.engine.model import build_model, compile_for_training
from workers.engine.sinks import MemorySink
from workers.engine.spec import Spec
from workers.engine.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py

# The engine tests' tiny model (tests/engine/tiny.py) with a shared expert, on a shorter run of smaller batches.
BASE = merged(
    TINY,
    model={"moe": {"num_shared_experts": 1}},
    training={
        "max_steps": 12,
        "batch_size": 4,
        "eval_interval": 6,
        "eval_batches": 1,
        "checkpoint_interval": 6,
        "seed": 5,
    },
)


def make_spec(**training: object) -> Spec:
    return merged_spec(BASE, training=dict(training))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """The first 100 documents of the letter corpus, split with this module's seed (not conftest's fixture)."""
    path = write_letters_corpus(tmp_path_factory.mktemp("corpus") / "letters.jsonl", documents=100)
    return prepare(make_spec(), path, tmp_path_factory.mktemp("prepared"))


def test_grouped_matmul_operator_passes_opcheck_with_fp32_and_an_empty_group() -> None:
    """The custom operator's fake (shape) function, autograd registration and schema agree with its kernel,
    on the grouped_mm path (widths a multiple of 16 bytes) and on the loop path (odd widths)."""
    counts = torch.tensor([3, 0, 5])
    for k, n in ((16, 8), (6, 5)):
        x = torch.randn(8, k, requires_grad=True)
        w = torch.randn(3, k, n, requires_grad=True)
        torch.library.opcheck(torch.ops.moe_engine.grouped_matmul.default, (x, w, counts))
        ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
        out = grouped_matmul(x, w, counts)
        torch.testing.assert_close(out, ref)
        out.sum().backward()  # a stride-0 incoming gradient: the backward makes it contiguous
        assert w.grad is not None and torch.equal(w.grad[1], torch.zeros(k, n))  # the empty group's gradient
    assert count_per_expert(torch.tensor([2, 0, 2, 2]), 4).tolist() == [1, 0, 3, 0]


def test_compiled_model_gives_the_eager_loss_gradients_and_router_loads() -> None:
    spec = make_spec()
    torch.manual_seed(0)
    eager = build_model(spec).train()
    twin = copy.deepcopy(eager)
    compiled = compile_for_training(twin)
    ids = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(1))

    expected = eager(ids, labels=ids)
    got = compiled(ids, labels=ids, return_logits=False)  # as a training step calls it: the fused head_loss
    assert expected.loss is not None and got.loss is not None
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.expert_load, expected.expert_load)
    expected.loss.backward()
    got.loss.backward()
    twins = dict(twin.named_parameters())
    for name, param in eager.named_parameters():
        assert param.grad is not None and twins[name].grad is not None, name
        torch.testing.assert_close(twins[name].grad, param.grad, rtol=1e-4, atol=1e-5, msg=name)
    # The router loads the compiled forward accumulated (a buffer it mutates) are the eager ones.
    for (name, a), b in zip(eager.named_buffers(), twin.buffers(), strict=True):
        assert torch.equal(a, b), name
    # With gradient checkpointing the compiled blocks are recomputed in backward: the same gradients again.
    twin.gradient_checkpointing = True
    twin.zero_grad(set_to_none=True)
    again = compiled(ids, labels=ids, return_logits=False).loss
    assert again is not None
    again.backward()
    for name, param in eager.named_parameters():
        torch.testing.assert_close(twins[name].grad, param.grad, rtol=1e-4, atol=1e-5, msg=name)
    # Compiled in place of nothing: the eager module's state_dict keys are unchanged.
    assert twin.state_dict().keys() == eager.state_dict().keys()
    assert not any(key.startswith("_orig_mod") for key in twin.state_dict())


def test_a_compiled_run_resumes_eager_and_an_eager_run_resumes_compiled(prepared: PreparedData, tmp_path: Path) -> None:
    reference = MemorySink()
    assert train(make_spec(), prepared, tmp_path / "eager", reference).status == "completed"
    expected = dict(reference.series("loss"))
    assert expected[12] < 0.7 * expected[1]  # the tiny model learns

    # Compiled for steps 1-6, then eager from the step-6 checkpoint.
    first, second = MemorySink(), MemorySink()
    assert train(make_spec(compile=True), prepared, tmp_path / "a", first, stop_after_step=6).step == 6
    assert [e["step"] for e in first.events_of("compiling")] == [0]
    (compiled_event,) = first.events_of("compiled")
    assert compiled_event["seconds"] > 0
    assert dict(first.series("step_time_s")).keys() == set(range(2, 7))  # the compiling step is not a step time
    assert train(make_spec(), prepared, tmp_path / "a", second).status == "completed"
    assert second.events_of("resume")[0]["step"] == 6 and not second.events_of("compiling")

    # Eager for steps 1-6, then compiled from the checkpoint.
    third, fourth = MemorySink(), MemorySink()
    assert train(make_spec(), prepared, tmp_path / "b", third, stop_after_step=6).step == 6
    assert train(make_spec(compile=True), prepared, tmp_path / "b", fourth).status == "completed"
    assert [e["step"] for e in fourth.events_of("compiling")] == [6]

    # Compiled steps differ from eager ones only by rounding: every loss of both split runs follows the eager run.
    for sinks in ((first, second), (third, fourth)):
        losses = {**dict(sinks[0].series("loss")), **dict(sinks[1].series("loss"))}
        assert losses.keys() == expected.keys()
        for step, loss in losses.items():
            assert loss == pytest.approx(expected[step], rel=1e-3), step


def test_the_time_estimate_counts_the_compile_once_in_the_run_total() -> None:
    off, on = make_spec(), make_spec(compile=True)
    hardware = PROFILES["cpu"]
    estimate_off, estimate_on = estimate_time(off, hardware), estimate_time(on, hardware)
    assert estimate_off.compile_seconds == 0 and estimate_on.compile_seconds > 0
    assert estimate_on.step_seconds == estimate_off.step_seconds  # the estimate does not claim a faster step
    assert estimate_on.total_seconds == pytest.approx(estimate_off.total_seconds + estimate_on.compile_seconds)
    # One compiled graph per kind of block: a dense first layer adds a second compile.
    dense_first = merged_spec(BASE, model={"moe": {"first_dense_layers": 1}}, training={"compile": True})
    assert estimate_compile_seconds(dense_first) == 2 * estimate_compile_seconds(on)
