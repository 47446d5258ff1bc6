"""Multi-token prediction (DeepSeek-V3): the MTP loss against a straightforward reference, depth 0 unchanged,
generation ignoring the modules."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from workers.engine.generation import generate
from workers.engine.kernels import IGNORE_INDEX
from workers.engine.model import MoEFeedForward, MoETransformer, build_model
from workers.engine.spec import Spec

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py


def make_spec(mtp_depth: int, moe: dict[str, Any] | None = None, **model: Any) -> Spec:
    m: dict[str, Any] = {
        "vocab_size": 300,
        "num_layers": 2,
        "hidden_size": 32,
        "num_heads": 4,
        "max_seq_len": 32,
        "mtp_depth": mtp_depth,
        "moe": {"num_routed_experts": 4, "top_k": 2, "expert_hidden_size": 16, **(moe or {})},
        **model,
    }
    return Spec.model_validate(
        {"model": m, "training": {"mtp_loss_weight": 0.25}, "data": {"tokenizer": "bytes", "seq_len": 16}}
    )


def reference_mtp_loss(model: MoETransformer, ids: Tensor, labels: Tensor) -> Tensor:
    """DeepSeek-V3's MTP loss written plainly: depth d runs on the T - d positions that have a token d ahead,
    combining ``h^{d-1}_t`` with the embedding of token t + d, and is scored on label t + d + 1."""
    B, T = ids.shape
    h = model._trunk(ids)[0]  # the main blocks' output, before the final norm
    losses = []
    for d, module in enumerate(model.mtp_modules, start=1):
        n = T - d  # positions with a token d ahead
        h_prev = h[:, :n]
        combined = module.proj(
            torch.cat((module.hidden_norm(h_prev), module.embed_norm(model.embed(ids[:, d:]))), dim=-1)
        )
        h, _ = module.block(combined, model.rope_cos[:n], model.rope_sin[:n])
        logits = F.linear(module.norm(h), model.head_weight)  # (B, n, V)
        targets = torch.full((B, n), IGNORE_INDEX)
        targets[:, : n - 1] = labels[:, d + 1 :]  # the last position has no label d + 1 ahead
        losses.append(F.cross_entropy(logits.reshape(B * n, -1), targets.reshape(-1), ignore_index=IGNORE_INDEX))
    return torch.stack(losses).mean()


@pytest.mark.parametrize(
    ("depth", "model"),
    [
        pytest.param(1, {}, id="depth-1"),
        pytest.param(2, {"tie_embeddings": False}, id="depth-2-untied"),
        pytest.param(2, {"attention": "mla", "moe": {"first_dense_layers": 2}}, id="depth-2-mla-dense"),
    ],
)
def test_mtp_loss_and_its_gradients_match_a_straightforward_reference(depth: int, model: dict[str, Any]) -> None:
    spec = make_spec(depth, model.get("moe"), **{k: v for k, v in model.items() if k != "moe"})
    torch.manual_seed(0)
    built = build_model(spec).eval()  # eval: no router-load bookkeeping, no dropout
    ids = torch.randint(0, 300, (2, 12))
    labels = ids.clone()
    labels[1, 9:] = IGNORE_INDEX  # padding at the end of the second sequence
    out = built(ids, labels=labels)
    assert out.mtp_loss is not None and out.loss is not None and out.task_loss is not None
    ref = reference_mtp_loss(built, ids, labels)
    torch.testing.assert_close(out.mtp_loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.task_loss + out.aux_loss + 0.25 * out.mtp_loss)

    params = [p for p in built.parameters()]
    got = torch.autograd.grad(out.mtp_loss, params, allow_unused=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    names = [n for n, _ in built.named_parameters()]
    for g, w, name in zip(got, want, names, strict=True):
        if w is None:
            assert g is None or not g.any(), name
            continue
        assert g is not None, name
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=name)
    # The MTP loss trains the shared embedding and head and every MTP module, and reaches the main blocks.
    trained = {n for n, g in zip(names, got, strict=True) if g is not None and g.any()}
    assert "embed.weight" in trained and any(n.startswith("mtp.") for n in trained)
    assert any(n.startswith("layers.0.") for n in trained)


def test_depth_0_has_no_mtp_parameters_and_the_same_loss_as_before() -> None:
    torch.manual_seed(0)
    model = build_model(make_spec(0))
    assert not [n for n, _ in model.named_parameters() if "mtp" in n]
    ids = torch.randint(0, 300, (2, 12))
    out = model(ids, labels=ids)
    assert out.mtp_loss is None and out.loss is not None and out.task_loss is not None
    assert torch.equal(out.loss, out.task_loss + out.aux_loss)


def test_mtp_leaves_the_main_model_and_generation_alone() -> None:
    """A depth-1 model and a depth-0 model with the same main weights give the same logits, next-token loss
    and generated text: the MTP modules are an extra training signal only."""
    torch.manual_seed(0)
    with_mtp = build_model(make_spec(1)).eval()
    without = build_model(make_spec(0)).eval()
    missing, unexpected = without.load_state_dict(with_mtp.state_dict(), strict=False)
    assert missing == [] and unexpected and all(k.startswith("mtp.") for k in unexpected)
    ids = torch.randint(0, 300, (2, 12))
    a, b = with_mtp(ids, labels=ids), without(ids, labels=ids)
    assert torch.equal(a.logits, b.logits) and a.task_loss is not None and b.task_loss is not None
    assert torch.equal(a.task_loss, b.task_loss)
    assert with_mtp(ids).mtp_loss is None  # no labels: the modules do not run
    prompt = ids[:, :4]
    assert torch.equal(generate(with_mtp, prompt, 8, temperature=0.0), generate(without, prompt, 8, temperature=0.0))


def test_mtp_modules_balance_their_routers_too() -> None:
    spec = make_spec(1)
    torch.manual_seed(0)
    model = build_model(spec).train()
    ids = torch.randint(0, 300, (4, 16))
    model(ids, labels=ids)
    ffn = model.mtp_modules[0].block.ffn
    assert isinstance(ffn, MoEFeedForward)  # the same kind as the model's top block
    router = ffn.router
    assert int(router.load_accum.sum()) == 4 * 16 * 2  # every position of the grid, top-2
    model.update_router_biases()
    assert int(router.load_accum.sum()) == 0 and bool(router.bias.abs().sum() > 0)
