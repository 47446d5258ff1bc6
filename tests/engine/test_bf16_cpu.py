"""bf16 training on CPU: the CPU profile offers bf16 only with native units (and the estimator and lint follow
it), the expert rows padded for oneDNN compute what unpadded rows do, and a bf16 run trains the tiny model down
and resumes exactly from its checkpoint.

The tiny model and corpus are tests/engine/tiny.py's (hidden 32, 2 layers, 4 routed experts, the a..p letter
cycle), prepared by tests/engine/conftest.py's ``prepared`` fixture as for test_train.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.tiny import losses, train_whole_and_resumed
from tests.engine.tiny import tiny_spec as make_spec
from workers.engine import model as model_module
from workers.engine.data import PreparedData
from workers.engine.estimate import estimate_time
from workers.engine.hardware import cpu_bf16_units, cpu_flags, cpu_profile
from workers.engine.lint import lint
from workers.engine.model import build_model, causal_attention, pad_expert_groups

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py

SAPPHIRE_RAPIDS_FLAGS = "fpu vme sse sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"
SKYLAKE_FLAGS = "fpu vme sse sse2 avx2 avx512f avx512bw avx512_vnni"


def test_flags_are_read_from_cpuinfo_and_name_the_native_bf16_units() -> None:
    cpuinfo = f"processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: {SAPPHIRE_RAPIDS_FLAGS}\n\nprocessor\t: 1\n"
    assert "amx_tile" in cpu_flags(cpuinfo)
    assert cpu_bf16_units(cpu_flags(cpuinfo)) == ("AMX", "AVX-512 BF16")
    assert cpu_bf16_units(frozenset(SKYLAKE_FLAGS.split())) == ()
    # AMX's bf16 instructions are useless without its tile registers (a kernel that did not enable them).
    assert cpu_bf16_units(frozenset({"amx_bf16"})) == ()
    assert cpu_flags("no flags here") == frozenset()


def test_the_cpu_profile_offers_bf16_only_where_the_cpu_multiplies_it_natively() -> None:
    amx = cpu_profile(frozenset(SAPPHIRE_RAPIDS_FLAGS.split()))
    avx512 = cpu_profile(frozenset({"avx512f", "avx512_bf16"}))
    without = cpu_profile(frozenset(SKYLAKE_FLAGS.split()))
    assert amx.supports("bf16") and avx512.supports("bf16") and not without.supports("bf16")
    assert without.peak_flops["bf16"] is None and "no native bf16" in without.notes
    fp32 = amx.peak_flops["fp32"]
    assert fp32 is not None
    assert amx.peak_flops["bf16"] == pytest.approx(3.8 * fp32)  # measured: python -m bench.precision
    assert "AMX" in amx.notes and not amx.supports("fp16")


def test_the_estimator_times_bf16_at_its_peak_only_where_the_cpu_has_it() -> None:
    fp32, bf16 = make_spec(), make_spec(training={"precision": "bf16"})
    amx = cpu_profile(frozenset(SAPPHIRE_RAPIDS_FLAGS.split()))
    without = cpu_profile(frozenset(SKYLAKE_FLAGS.split()))
    fast, slow = estimate_time(bf16, amx), estimate_time(fp32, amx)
    assert fast.precision_supported and fast.compute_seconds < slow.compute_seconds
    emulated = estimate_time(bf16, without)
    assert not emulated.precision_supported
    assert emulated.compute_seconds == pytest.approx(estimate_time(fp32, without).compute_seconds)


def test_lint_suggests_bf16_on_a_cpu_that_has_it_and_refuses_it_on_one_that_does_not() -> None:
    amx = cpu_profile(frozenset(SAPPHIRE_RAPIDS_FLAGS.split()))
    without = cpu_profile(frozenset(SKYLAKE_FLAGS.split()))
    advice = {a.code: a for a in lint(make_spec(), hardware=amx)}
    assert advice["fp32_on_bf16_cpu"].severity == "info"
    assert advice["fp32_on_bf16_cpu"].patch == {"training.precision": "bf16"}
    assert "fp32_on_bf16_cpu" not in {a.code for a in lint(make_spec(), hardware=without)}
    assert "fp32_on_bf16_cpu" not in {a.code for a in lint(make_spec(training={"precision": "bf16"}), hardware=amx)}
    refused = {a.code: a for a in lint(make_spec(training={"precision": "bf16"}), hardware=without)}
    assert refused["precision_unsupported"].patch == {"training.precision": "fp32"}


def test_padding_expert_groups_keeps_every_row_and_pads_with_zero_gates() -> None:
    token_of = torch.tensor([5, 1, 2, 7, 0, 3, 4])
    counts = torch.tensor([3, 0, 4])
    gate = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], requires_grad=True)
    padded_tokens, padded_counts, padded_gate = pad_expert_groups(token_of, counts, gate, 4)
    assert padded_counts.tolist() == [4, 0, 4]
    assert padded_tokens.tolist() == [5, 1, 2, 0, 7, 0, 3, 4]
    assert padded_gate.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.0, 0.4, 0.5, 0.6, 0.7])
    padded_gate.sum().backward()
    assert gate.grad is not None and gate.grad.tolist() == [1.0] * 7  # the padding is connected to nothing


def test_padded_expert_rows_give_the_unpadded_outputs_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast the MoE layer pads each expert's rows (``CPU_LOW_PRECISION_GROUP_ROWS``); with no
    padding (a multiple of 1) the same model gives the same loss and gradients, to bf16's rounding."""
    spec = make_spec(model={"moe": {"num_routed_experts": 4, "top_k": 2, "expert_hidden_size": 32}})
    ids = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for multiple in (1, 16):
        monkeypatch.setattr(model_module, "CPU_LOW_PRECISION_GROUP_ROWS", multiple)
        torch.manual_seed(0)
        model = build_model(spec).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        assert loss is not None
        loss.backward()
        results[multiple] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (loss_1, grads_1), (loss_16, grads_16) = results[1], results[16]
    torch.testing.assert_close(loss_16, loss_1, rtol=1e-3, atol=1e-3)
    assert grads_1.keys() == grads_16.keys() and any("w_in" in name for name in grads_1)
    for name, grad in grads_1.items():
        torch.testing.assert_close(grads_16[name], grad, rtol=0.05, atol=2e-3, msg=name)


def test_attention_trains_in_fp32_under_cpu_autocast_and_infers_in_bf16() -> None:
    q, k, v = (torch.randn(2, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        training = causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
        with torch.no_grad():
            inference = causal_attention(q, k, v, is_causal=True)
    assert training.dtype == torch.float32 and inference.dtype == torch.bfloat16
    torch.testing.assert_close(training, reference, rtol=0.02, atol=0.02)  # inputs rounded to bf16 once
    torch.testing.assert_close(inference.float(), reference, rtol=0.05, atol=0.05)


def test_bf16_on_cpu_trains_the_tiny_model_down_and_resumes_exactly(prepared: PreparedData, tmp_path: Path) -> None:
    spec = make_spec(training={"precision": "bf16", "checkpoint_interval": 5})
    # Stopped at step 7 (between checkpoints) and resumed: the same steps as the uninterrupted run, bit for bit.
    whole, weights = train_whole_and_resumed(spec, prepared, tmp_path, stop_after_step=7)
    loss = losses(whole)
    first, last = [loss[s] for s in (1, 2, 3)], [loss[s] for s in (18, 19, 20)]
    assert sum(last) < 0.5 * sum(first), (first, last)
    assert whole.series("val_loss")[-1][1] < 0.5 * loss[1]
    assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 master weights under autocast
