"""The MoE transformer against naive references: routing, dispatch, capacity, balancing, losses, heads."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from workers.engine import kernels
from workers.engine.generation import generate
from workers.engine.kernels import grouped_matmul, head_loss, linear_cross_entropy, rms_norm, rope_qkv, rope_tables
from workers.engine.model import Attention, MoEFeedForward, MoETransformer, build_model
from workers.engine.spec import Spec


def make_spec(model: dict[str, Any] | None = None, moe: dict[str, Any] | None = None, **training: Any) -> Spec:
    """A tiny spec; ``model``/``moe``/``training`` override the defaults."""
    m: dict[str, Any] = {
        "vocab_size": 300,
        "num_layers": 2,
        "hidden_size": 32,
        "num_heads": 4,
        "max_seq_len": 32,
        "moe": {"num_routed_experts": 8, "top_k": 2, "expert_hidden_size": 16, "num_shared_experts": 1},
    }
    m.update(model or {})
    m["moe"] = {**m["moe"], **(moe or {})}
    return Spec.model_validate({"model": m, "training": training, "data": {"tokenizer": "bytes", "seq_len": 16}})


def moe_layer(spec: Spec, seed: int = 0) -> MoEFeedForward:
    """The first MoE layer of ``spec``'s model, re-initialised with weights large enough to route decisively."""
    torch.manual_seed(seed)
    model = build_model(spec)
    layer = model.moe_layers[0]
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.5)
        layer.w_in.normal_(0.0, 0.2)
        layer.w_out.normal_(0.0, 0.2)
        if layer.shared is not None:
            layer.shared.w_in.weight.normal_(0.0, 0.2)
            layer.shared.w_out.weight.normal_(0.0, 0.2)
    return layer


def _act(h: Tensor, activation: str, hidden: int) -> Tensor:
    if activation == "swiglu":
        return F.silu(h[:hidden]) * h[hidden:]
    return F.gelu(h) if activation == "gelu" else F.relu(h)


def reference_moe(layer: MoEFeedForward, x: Tensor, training: bool) -> tuple[Tensor, Tensor]:
    """Token-by-token, expert-by-expert DeepSeekMoE with the documented capacity rule.

    Returns ``(out (N, C), kept assignments per expert (E,))``.
    """
    moe, act, H = layer.moe, layer.activation, layer.hidden
    N, E, k = x.shape[0], layer.num_experts, layer.top_k
    assignments: list[tuple[int, int, int, Tensor]] = []  # (flat index, token, expert, weight)
    for t in range(N):
        logits = (x[t] @ layer.router.weight.T) / moe.router_temperature
        scores = logits.softmax(-1) if moe.scoring == "softmax" else logits.sigmoid()
        bias = layer.router.bias if moe.balancing == "aux_free" else torch.zeros(E)
        selection = [float((scores[e] + bias[e]).detach()) for e in range(E)]
        eligible = list(range(E))
        if moe.n_group > 1:  # group-limited: a group scores its best two (sigmoid) or its best (softmax)
            size = E // moe.n_group
            members = [sorted(selection[g * size : (g + 1) * size], reverse=True) for g in range(moe.n_group)]
            group_score = [sum(m[:2]) if moe.scoring == "sigmoid" else m[0] for m in members]
            best = sorted(range(moe.n_group), key=lambda g: -group_score[g])[: moe.topk_group]
            eligible = [e for e in range(E) if e // size in best]
        chosen = sorted(eligible, key=lambda e: -selection[e])[:k]
        weights = torch.stack([scores[e] for e in chosen])
        if moe.scoring == "sigmoid":
            weights = weights / weights.sum()
        weights = weights * moe.routed_scaling_factor
        for slot, e in enumerate(chosen):
            assignments.append((t * k + slot, t, e, weights[slot]))
    kept_by_expert: dict[int, list[tuple[int, int, int, Tensor]]] = {e: [] for e in range(E)}
    for a in assignments:
        kept_by_expert[a[2]].append(a)
    if training and moe.capacity_factor is not None:
        cap = math.ceil(moe.capacity_factor * N * k / E)
        for e in range(E):
            ranked = sorted(kept_by_expert[e], key=lambda a: (-float(a[3].detach()), a[0]))
            kept_by_expert[e] = ranked[:cap]
    rows: list[Tensor] = []
    for t in range(N):
        row = torch.zeros(x.shape[1])
        for e in range(E):
            for _, tok, _, w in kept_by_expert[e]:
                if tok == t:
                    row = row + w * (_act(x[t] @ layer.w_in[e], act, H) @ layer.w_out[e])
        if layer.shared is not None:
            row = row + layer.shared(x[t])
        rows.append(row)
    kept = torch.tensor([len(kept_by_expert[e]) for e in range(E)])
    return torch.stack(rows), kept


MOE_CASES = [
    pytest.param({}, id="softmax-auxfree-shared"),
    pytest.param({"balancing": "aux_loss"}, id="softmax-auxloss"),
    pytest.param({"balancing": "none", "num_shared_experts": 0}, id="softmax-none-noshared"),
    pytest.param({"scoring": "sigmoid"}, id="sigmoid-auxfree"),
    pytest.param({"scoring": "sigmoid", "balancing": "aux_loss", "num_shared_experts": 2}, id="sigmoid-auxloss"),
    pytest.param({"capacity_factor": 0.5}, id="capacity-auxfree"),
    pytest.param({"capacity_factor": 0.75, "scoring": "sigmoid", "balancing": "aux_loss"}, id="capacity-sigmoid"),
    pytest.param({"router_temperature": 2.0, "top_k": 3}, id="temperature-top3"),
    pytest.param({"expert_hidden_size": 6}, id="loop-fallback"),  # 24-byte rows: not grouped_mm-aligned
    pytest.param({"n_group": 4, "topk_group": 2, "scoring": "sigmoid", "routed_scaling_factor": 2.5}, id="groups-v3"),
    pytest.param({"n_group": 2, "topk_group": 1, "balancing": "aux_loss"}, id="groups-softmax-auxloss"),
    pytest.param({"n_group": 4, "topk_group": 3, "top_k": 3, "capacity_factor": 0.75}, id="groups-capacity"),
    pytest.param({"routed_scaling_factor": 1.5, "balancing": "none"}, id="scaled"),
]


@pytest.mark.parametrize("moe", MOE_CASES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_moe_layer_matches_per_token_reference(moe: dict[str, Any], activation: str) -> None:
    layer = moe_layer(make_spec({"activation": activation}, moe)).train()
    with torch.no_grad():
        layer.router.bias.normal_(0.0, 0.3)  # aux_free must choose by score + bias; others must ignore it
    x = torch.randn(2, 12, 32)
    x_ref = x.detach().clone().reshape(24, 32).requires_grad_()
    x = x.requires_grad_()

    out, stats = layer(x)
    ref, kept = reference_moe(layer, x_ref, training=True)
    torch.testing.assert_close(out.reshape(24, 32), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(stats.kept, kept)
    if "capacity_factor" in moe:
        assert stats.kept.sum() < stats.routed.sum()  # the case really drops something

    # Backward: the same gradients as the reference's autograd, for the input and every parameter.
    grad_out = torch.randn_like(ref)
    params = list(layer.parameters())
    got = torch.autograd.grad(out.reshape(24, 32), [x, *params], grad_out, allow_unused=True)
    want = torch.autograd.grad(ref, [x_ref, *params], grad_out, allow_unused=True)
    for g, w, name in zip(got, want, ["x", *[n for n, _ in layer.named_parameters()]], strict=True):
        assert g is not None and w is not None, name
        torch.testing.assert_close(g.reshape(w.shape), w, atol=1e-5, rtol=1e-5, msg=name)


def test_gradients_reach_exactly_the_used_experts() -> None:
    layer = moe_layer(make_spec(moe={"num_routed_experts": 16, "top_k": 1})).train()
    x = torch.randn(1, 6, 32)  # 6 tokens, top-1: at most 6 of the 16 experts are used
    out, stats = layer(x)
    out.sum().backward()  # a stride-0 gradient: grouped_mm's backward must cope
    assert layer.w_in.grad is not None and layer.w_out.grad is not None
    used = stats.kept > 0
    assert 0 < int(used.sum()) <= 6
    per_expert = layer.w_in.grad.abs().sum(dim=(1, 2))
    assert torch.all(per_expert[used] > 0) and torch.all(per_expert[~used] == 0)
    assert torch.all(layer.w_out.grad.abs().sum(dim=(1, 2))[used] > 0)
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("rows", [[3, 0, 5, 4], [0, 0, 12, 0]])
@pytest.mark.parametrize("width", [8, 6])  # 6 fp32 = 24-byte rows: the loop fallback
def test_grouped_matmul_matches_per_group_products(rows: list[int], width: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(sum(rows), width, requires_grad=True)
    w = torch.randn(len(rows), width, 12, requires_grad=True)
    out = grouped_matmul(x, w, torch.tensor(rows))
    parts = [xs @ w[e] for e, xs in enumerate(x.split(rows))]
    want = torch.cat(parts)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(out, [x, w], g), torch.autograd.grad(want, [x, w], g))


@pytest.mark.parametrize("shape", [(3, 7, 32), (5, 16)])
def test_rms_norm_matches_torch_rms_norm(shape: tuple[int, ...]) -> None:
    """Values and the input and weight gradients of the pass-saving RMSNorm equal ``F.rms_norm``'s, for an
    upstream gradient that is not contiguous too."""
    torch.manual_seed(3)
    x = (torch.randn(*shape) * 3).requires_grad_()
    weight = torch.rand(shape[-1]).add_(0.5).requires_grad_()
    got = rms_norm(x, weight, 1e-5)
    want = F.rms_norm(x, (shape[-1],), weight, 1e-5)
    torch.testing.assert_close(got, want)
    upstream = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]  # stride 2 in the last dimension
    torch.testing.assert_close(
        torch.autograd.grad(got, [x, weight], upstream), torch.autograd.grad(want, [x, weight], upstream)
    )
    # bf16 input takes PyTorch's own path and keeps its dtype.
    low = x.detach().bfloat16()
    torch.testing.assert_close(
        rms_norm(low, weight.detach(), 1e-5), F.rms_norm(low, (shape[-1],), weight.detach(), 1e-5)
    )


def _rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The textbook rotary map of ``x`` ``(B, T, H, D)``, ``cos``/``sin`` ``(T, D/2)``."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 1)])
@pytest.mark.parametrize("autocast", [False, True])
def test_rope_qkv_gives_the_values_and_gradient_of_split_then_rotate(heads: int, kv_heads: int, autocast: bool) -> None:
    """Queries, keys and values of the fused projection and the projection's gradient equal the plain split,
    rotation and transposes', also for upstream gradients that are not contiguous and under bf16 autocast (where
    the projection is bf16 and queries and keys come out in fp32)."""
    torch.manual_seed(4)
    B, T, D = 2, 5, 8
    cos, sin = rope_tables(D, T, 10_000.0)
    dtype = torch.bfloat16 if autocast else torch.float32
    qkv = torch.randn(B, T, (heads + 2 * kv_heads) * D).to(dtype).requires_grad_()

    def reference(x: Tensor) -> tuple[Tensor, ...]:
        q, k, v = x.view(B, T, heads + 2 * kv_heads, D).split([heads, kv_heads, kv_heads], dim=2)
        return (_rotate_half(q, cos, sin).transpose(1, 2), _rotate_half(k, cos, sin).transpose(1, 2), v.transpose(1, 2))

    got, want = rope_qkv(qkv, cos, sin, heads, kv_heads), reference(qkv)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b)
    upstream = [torch.randn(*t.shape[:-1], 2 * D).to(t.dtype)[..., ::2] for t in want]  # stride 2
    (grad,) = torch.autograd.grad(got, qkv, upstream)
    if not autocast:
        torch.testing.assert_close(grad, torch.autograd.grad(want, qkv, upstream)[0])
    else:
        # The bf16 gradient is the fp32 one rounded once (autograd's own graph rounds each product's gradient to
        # bf16 before adding them).
        exact = qkv.detach().float().requires_grad_()
        (want_grad,) = torch.autograd.grad(reference(exact), exact, [u.float() for u in upstream])
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.float(), want_grad, rtol=2**-8, atol=1e-6)


def _imbalance(load: Tensor) -> float:
    """Max expert load over the mean load (1.0 is perfectly balanced)."""
    return float(load.max() / load.mean())


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_aux_free_bias_updates_move_load_towards_balance(scoring: str) -> None:
    spec = make_spec(
        model={"num_layers": 1}, moe={"bias_update_speed": 0.005, "num_shared_experts": 0, "scoring": scoring}
    )
    torch.manual_seed(0)
    model = build_model(spec).train()
    layer = model.moe_layers[0]
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.3)  # tokens disagree about experts, as in a trained router
        # Skew the routing: every token shares a direction u that experts 0 and 1 respond to.
        u = F.normalize(torch.randn(32), dim=0)
        model.embed.weight += 0.02 * u
        layer.router.weight[:2] += u
    ids = torch.randint(0, 300, (8, 16))
    before = model(ids).expert_load[0]
    model.update_router_biases()
    for _ in range(80):
        model(ids)
        model.update_router_biases()
    after = model(ids).expert_load[0]
    assert _imbalance(before) > 1.8
    assert _imbalance(after) < 1.0 + 0.4 * (_imbalance(before) - 1.0)
    bias = model.router_biases()["layers.0.ffn.router.bias"]
    assert bias[:2].max() < bias[2:].min()  # the favoured experts were pushed down
    assert abs(float(bias.mean())) < 1e-5  # centred


def test_bias_updates_count_training_forwards_once_and_only_for_aux_free() -> None:
    ids = torch.randint(0, 300, (2, 16))
    spec = make_spec(moe={"capacity_factor": 1.0}, gradient_checkpointing=True)
    model = build_model(spec).train()
    model(ids, labels=ids).loss.backward()  # checkpointing re-runs blocks in backward
    accum = model.moe_layers[0].router.load_accum
    assert int(accum.sum()) == 2 * 16 * 2  # tokens x top_k, counted once
    model.eval()
    model(ids)
    assert int(accum.sum()) == 2 * 16 * 2  # evaluation does not count
    model.update_router_biases()
    assert int(accum.sum()) == 0
    assert torch.count_nonzero(model.moe_layers[0].router.bias) > 0

    plain = build_model(make_spec(moe={"balancing": "aux_loss"})).train()
    plain(ids)
    plain.update_router_biases()
    assert all(torch.count_nonzero(b) == 0 for b in plain.router_biases().values())


def test_router_bias_is_persistent_state() -> None:
    model = build_model(make_spec(moe={"first_dense_layers": 1}, model={"num_layers": 3}))
    state = model.state_dict()
    names = list(model.router_biases())
    assert names == ["layers.1.ffn.router.bias", "layers.2.ffn.router.bias"]
    assert all(n in state and state[n].dtype == torch.float32 for n in names)
    assert not any("load_accum" in n or "rope" in n for n in state)
    with torch.no_grad():
        model.router_biases()[names[0]].fill_(0.25)
    clone = build_model(make_spec(moe={"first_dense_layers": 1}, model={"num_layers": 3}))
    clone.load_state_dict(model.state_dict())
    assert torch.all(clone.router_biases()[names[0]] == 0.25)


def test_aux_loss_is_positive_differentiable_and_matches_formula() -> None:
    spec = make_spec(model={"num_layers": 1}, moe={"balancing": "aux_loss", "aux_loss_coef": 0.1})
    model = build_model(spec).train()
    ids = torch.randint(0, 300, (2, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss.item() > 0
    assert out.loss is not None and out.task_loss is not None
    torch.testing.assert_close(out.loss, out.task_loss + out.aux_loss)
    (grad,) = torch.autograd.grad(out.aux_loss, model.moe_layers[0].router.weight)
    assert grad.abs().sum() > 0

    # Recompute E * sum_i f_i P_i by hand from the layer's input.
    layer = model.moe_layers[0]
    x = model.blocks[0].ffn_norm(model.embed(ids))  # any input works for the formula
    _, scores, chosen, _ = layer.route(x.reshape(-1, 32))
    f = torch.bincount(chosen.reshape(-1), minlength=8).float() / chosen.numel()
    want = 0.1 * 8 * torch.dot(f, scores.mean(0))
    _, stats = layer(x)
    torch.testing.assert_close(stats.aux, want)


def test_z_loss_penalises_router_logits() -> None:
    spec = make_spec(model={"num_layers": 1}, moe={"balancing": "none", "router_z_loss_coef": 0.01})
    layer = moe_layer(spec)
    x = torch.randn(1, 10, 32)
    _, stats = layer(x)
    logits = x.reshape(10, 32) @ layer.router.weight.T
    torch.testing.assert_close(stats.aux, 0.01 * torch.logsumexp(logits, -1).square().mean())
    (grad,) = torch.autograd.grad(stats.aux, layer.router.weight)
    # A gradient step on the z-loss alone shrinks the logits' log-sum-exp.
    with torch.no_grad():
        layer.router.weight.sub_(grad)
        _, after = layer(x)
    assert after.aux < stats.aux
    none = moe_layer(make_spec(model={"num_layers": 1}, moe={"balancing": "none"}))
    assert none(x)[1].aux.item() == 0.0


def test_expert_load_and_dropped_fraction() -> None:
    ids = torch.randint(0, 300, (2, 16))
    model = build_model(make_spec(moe={"first_dense_layers": 1}, model={"num_layers": 3})).train()
    out = model(ids)
    assert out.expert_load.shape == (2, 8)
    torch.testing.assert_close(out.expert_load.sum(1), torch.ones(2))
    assert out.dropped_fraction.item() == 0.0 and not out.expert_load.requires_grad

    capped = build_model(make_spec(moe={"capacity_factor": 0.5})).train()
    with torch.no_grad():
        for layer in capped.moe_layers:
            layer.router.weight[0] += 1.0  # overload expert 0 so that capacity bites
    out = capped(ids)
    dropped = 1.0 - out.expert_load.sum(1)  # per layer
    assert out.dropped_fraction.item() > 0
    torch.testing.assert_close(out.dropped_fraction, dropped.mean())
    cap = math.ceil(0.5 * 32 * 2 / 8)
    assert torch.all(out.expert_load * 64 <= cap + 1e-6)
    assert capped.eval()(ids).dropped_fraction.item() == 0.0  # evaluation never drops

    dense = build_model(make_spec(moe={"first_dense_layers": 2}))
    out = dense(ids)
    assert out.expert_load.shape == (0, 8) and out.aux_loss.item() == 0.0


@pytest.mark.parametrize(
    "model_overrides",
    [{}, {"num_kv_heads": 2, "norm": "layernorm", "activation": "relu"}, {"tie_embeddings": False}],
)
def test_changing_a_future_token_leaves_earlier_logits_alone(model_overrides: dict[str, Any]) -> None:
    model = build_model(make_spec(model_overrides)).eval()
    ids = torch.randint(0, 300, (2, 16))
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 300
    a, b = model(ids).logits, model(changed).logits
    assert a.shape == (2, 16, 300)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_causal_lm_loss_is_shifted_cross_entropy() -> None:
    model = build_model(make_spec(label_smoothing=0.1)).eval()
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.clone()
    labels[0, 12:] = -100
    out = model(ids, labels=labels)
    want = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=0.1
    )
    assert out.task_loss is not None
    torch.testing.assert_close(out.task_loss, want)
    assert model(ids).loss is None


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("logits_used", [False, True])
def test_linear_cross_entropy_matches_matmul_then_torch_cross_entropy(
    smoothing: float, logits_used: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "_HEAD_CHUNK_ELEMENTS", 64 * 1500)  # 64 rows a chunk: 11 chunks, one short
    torch.manual_seed(4)
    x = torch.randn(700, 48, requires_grad=True)
    w = torch.randn(1500, 48, requires_grad=True)
    targets = torch.randint(0, 1500, (700,))
    targets[::5] = -100

    def total(loss: Tensor, logits: Tensor) -> Tensor:
        # A second use of the logits (as a distillation term would be) must reach x and w through them.
        return loss + (logits.square().mean() * 0.01 if logits_used else 0.0)

    loss, logits = linear_cross_entropy(x, w, targets, smoothing)
    got = torch.autograd.grad(total(loss, logits), (x, w))
    ref_logits = x @ w.t()
    ref_loss = F.cross_entropy(ref_logits, targets, ignore_index=-100, label_smoothing=smoothing)
    want = torch.autograd.grad(total(ref_loss, ref_logits), (x, w))
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_head_loss_gives_the_loss_and_gradients_of_matmul_then_cross_entropy(
    smoothing: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its gradients are computed in the forward and scaled by the incoming gradient in the backward."""
    monkeypatch.setattr(kernels, "_HEAD_LOSS_CHUNK_ELEMENTS", 64 * 1500)  # 64 rows a chunk: 11 chunks, one short
    torch.manual_seed(4)
    x = torch.randn(700, 48, requires_grad=True)
    w = torch.randn(1500, 48, requires_grad=True)
    targets = torch.randint(0, 1500, (700,))
    targets[::5] = -100
    loss = head_loss(x, w, targets, smoothing)
    got = torch.autograd.grad(loss * 0.25, (x, w))  # as a step of 4 accumulated micro-batches backpropagates
    ref_loss = F.cross_entropy(x @ w.t(), targets, ignore_index=-100, label_smoothing=smoothing)
    want = torch.autograd.grad(ref_loss * 0.25, (x, w))
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    again = head_loss(x, w, targets, smoothing)  # a retained graph backpropagated twice: each adds the gradients
    again.backward(retain_graph=True)
    again.backward()
    assert x.grad is not None and w.grad is not None
    torch.testing.assert_close(x.grad, want[0] * 8)
    torch.testing.assert_close(w.grad, want[1] * 8)


def test_head_loss_under_bf16_autocast_equals_linear_cross_entropy_and_skips_unwanted_gradients() -> None:
    torch.manual_seed(6)
    x = torch.randn(300, 64, requires_grad=True)
    w = torch.randn(700, 64, requires_grad=True)
    targets = torch.randint(0, 700, (300,))
    targets[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_loss(x, w, targets, 0.1)
        ref_loss, _ = linear_cross_entropy(x, w, targets, 0.1)
    torch.testing.assert_close(loss, ref_loss)
    got, want = torch.autograd.grad(loss, (x, w)), torch.autograd.grad(ref_loss, (x, w))
    assert got[0].dtype == got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    # A frozen head: only the input's gradient; without grad mode: only the loss, equal to the trained one's.
    frozen = head_loss(x, w.detach(), targets, 0.1)
    frozen.backward()
    assert x.grad is not None and w.grad is None
    with torch.no_grad():
        assert not head_loss(x, w, targets, 0.1).requires_grad


def test_linear_cross_entropy_with_a_frozen_head_gives_only_the_input_gradient() -> None:
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(30, 8)
    targets = torch.randint(0, 30, (10,))
    loss, _ = linear_cross_entropy(x, w, targets)
    loss.backward()
    assert x.grad is not None and w.grad is None
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.cross_entropy(x @ w.t(), targets), x)[0])


def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_linear_then_fp32_loss() -> None:
    """In a lower precision the head runs in autocast's dtype and the loss in fp32, as autocast's own path."""
    torch.manual_seed(6)
    x = torch.randn(300, 64, requires_grad=True)
    w = torch.randn(700, 64, requires_grad=True)
    targets = torch.randint(0, 700, (300,))
    targets[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = linear_cross_entropy(x, w, targets, 0.1)
        ref_logits = F.linear(x, w)
    ref_loss = F.cross_entropy(ref_logits.float(), targets, ignore_index=-100, label_smoothing=0.1)
    assert logits.dtype == ref_logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)
    got = torch.autograd.grad(loss, (x, w))
    want = torch.autograd.grad(ref_loss, (x, w))
    assert got[0].dtype == got[1].dtype == torch.float32
    # bf16 products: the reference rounds the weight gradient to bf16 once, this sums fp32 chunks.
    torch.testing.assert_close(got[0], want[0], atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(got[1], want[1], atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("tied", [False, True])
def test_the_training_forward_gives_the_gradients_of_the_plain_head_and_loss(tied: bool) -> None:
    """With labels the model takes the fused head + loss; its gradients equal logits-then-cross-entropy."""
    torch.manual_seed(5)
    spec = make_spec({"tie_embeddings": tied}, label_smoothing=0.1)
    fused = build_model(spec).train()
    plain = build_model(spec).train()
    plain.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.clone()
    labels[1, 10:] = -100
    with torch.random.fork_rng():
        out = fused(ids, labels=labels)
    with torch.random.fork_rng():
        ref = plain(ids)  # no labels: the plain head; the loss computed here as the model documents it
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    ref_task = F.cross_entropy(ref.logits.reshape(-1, 300), targets.reshape(-1), ignore_index=-100, label_smoothing=0.1)
    assert out.loss is not None and out.task_loss is not None
    torch.testing.assert_close(out.task_loss, ref_task)
    torch.testing.assert_close(out.logits, ref.logits)
    out.loss.backward()
    (ref_task + ref.aux_loss).backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_classification_pools_the_last_real_token() -> None:
    spec = make_spec({"task": "classification", "num_labels": 3})
    model = build_model(spec).eval()
    ids = torch.randint(3, 300, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 9:] = 0
    out = model(ids, labels=torch.tensor([0, 2]), attention_mask=mask)
    assert out.logits.shape == (2, 3) and out.loss is not None
    alone = model(ids[:1, :9]).logits  # the unpadded first sequence
    torch.testing.assert_close(out.logits[:1], alone)
    padded = ids.clone()
    padded[0, 9:] = 0  # what the pads contain does not matter
    torch.testing.assert_close(model(padded, attention_mask=mask).logits, out.logits)
    torch.testing.assert_close(model(ids).logits[1], out.logits[1])  # no mask: last token


def test_focal_loss() -> None:
    labels = torch.tensor([0, 2, 1])
    ids = torch.randint(3, 300, (3, 8))
    focal = build_model(make_spec({"task": "classification", "num_labels": 3}, loss="focal", focal_gamma=2.0))
    out = focal.eval()(ids, labels=labels)
    logp = F.log_softmax(out.logits, -1).gather(1, labels[:, None]).squeeze(1)
    assert out.task_loss is not None
    torch.testing.assert_close(out.task_loss, (-((1 - logp.exp()) ** 2) * logp).mean())
    flat = build_model(make_spec({"task": "classification", "num_labels": 3}, loss="focal", focal_gamma=0.0))
    flat.load_state_dict(focal.state_dict())
    out0 = flat.eval()(ids, labels=labels)
    assert out0.task_loss is not None
    torch.testing.assert_close(out0.task_loss, F.cross_entropy(out0.logits, labels))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    spec = make_spec(moe={"capacity_factor": 1.0, "first_dense_layers": 1}, model={"num_layers": 3})
    torch.manual_seed(0)
    plain = build_model(spec).train()
    ckpt = build_model(spec).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing = True
    ids = torch.randint(0, 300, (2, 16))
    a, b = plain(ids, labels=ids), ckpt(ids, labels=ids)
    assert a.loss is not None and b.loss is not None
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_parameter_layout_tied_and_untied() -> None:
    tied = build_model(make_spec())
    assert tied.lm_head is None
    untied = build_model(make_spec({"tie_embeddings": False}))
    assert untied.lm_head is not None
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 300 * 32


def test_init_std_and_scaled_residual_projections() -> None:
    model = build_model(make_spec({"init_std": 0.05, "num_layers": 8, "hidden_size": 64}))
    assert abs(float(model.embed.weight.detach().std()) - 0.05) < 0.005
    block = model.blocks[0]
    assert isinstance(block.attn, Attention)
    assert abs(float(block.attn.qkv.weight.detach().std()) - 0.05) < 0.005
    assert abs(float(block.attn.out.weight.detach().std()) - 0.05 / 4) < 0.002  # / sqrt(2 * 8)


def test_set_dropout_reaches_every_residual_dropout() -> None:
    model = build_model(make_spec())
    model.set_dropout(0.3)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 1 + 2 and all(d.p == 0.3 for d in drops)
    model.train()
    ids = torch.randint(0, 300, (1, 8))
    assert not torch.equal(model(ids).logits, model(ids).logits)


def test_bf16_autocast_forward_and_backward() -> None:
    model = build_model(make_spec())
    ids = torch.randint(0, 300, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def _greedy_without_cache(model: MoETransformer, ids: Tensor, steps: int) -> Tensor:
    for _ in range(steps):
        window = ids[:, -model.spec.model.max_seq_len :]
        nxt = model(window).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), 1)
    return ids


def test_generate_with_kv_cache_matches_full_recompute() -> None:
    torch.manual_seed(0)
    model = build_model(make_spec({"num_kv_heads": 2})).train()
    prompt = torch.randint(0, 300, (2, 5))
    got = generate(model, prompt, 40, temperature=0.0)  # runs past max_seq_len (32): sliding window
    assert got.shape == (2, 45) and model.training  # mode restored
    torch.testing.assert_close(got, _greedy_without_cache(model.eval(), prompt, 40))


def test_generate_sampling_and_eos() -> None:
    model = build_model(make_spec()).eval()
    prompt = torch.randint(0, 300, (3, 4))
    a = generate(model, prompt, 6, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 6, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 10)
    first = int(generate(model, prompt[:1], 1, temperature=0.0)[0, -1])
    out = generate(model, prompt, 8, temperature=0.0, eos_id=first)
    assert torch.all(out[0, 4:] == first)  # stays at eos once produced


# --------------------------------------------------------------------------------------------------------
# Group-limited routing (DeepSeek-V3)
# --------------------------------------------------------------------------------------------------------


def _scored_layer(scoring: str, **moe: Any) -> MoEFeedForward:
    """An MoE layer over 8 experts whose router logits are its input (hidden size 8, identity router)."""
    spec = make_spec(
        {"hidden_size": 8, "num_heads": 2},
        {"num_routed_experts": 8, "scoring": scoring, "balancing": "none", **moe},
    )
    layer = build_model(spec).moe_layers[0]
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(8))
    return layer


def test_group_limited_routing_picks_only_experts_of_the_best_groups() -> None:
    # 4 groups of 2 experts. Expert 0 has the single best score, but its partner is poor: with sigmoid scoring
    # a group counts its best two, so groups 1 (experts 2, 3) and 2 (experts 4, 5) win and expert 0 is never
    # chosen although it would be by plain top-k.
    logits = torch.tensor([[4.0, -4.0, 2.0, 1.9, 1.5, 1.4, -1.0, -1.2]])
    grouped = _scored_layer("sigmoid", n_group=4, topk_group=2, top_k=2)
    _, _, chosen, _ = grouped.route(logits)
    assert set(chosen[0].tolist()) == {2, 3}
    _, _, chosen, _ = _scored_layer("sigmoid", n_group=4, topk_group=2, top_k=3).route(logits)
    assert set(chosen[0].tolist()) == {2, 3, 4}  # the third comes from the second-best group, not group 0
    plain = _scored_layer("sigmoid", top_k=2)
    _, _, chosen, _ = plain.route(logits)
    assert set(chosen[0].tolist()) == {0, 2}

    # With softmax a group counts its best expert only: group 0 (expert 0) and group 1 win.
    _, _, chosen, _ = _scored_layer("softmax", n_group=4, topk_group=2, top_k=2).route(logits)
    assert set(chosen[0].tolist()) == {0, 2}
    _, _, chosen, _ = _scored_layer("softmax", n_group=4, topk_group=1, top_k=2).route(logits)
    assert set(chosen[0].tolist()) == {0, 1}  # one group: both of its experts, the poor one included


def test_the_aux_free_bias_also_steers_which_groups_are_eligible() -> None:
    logits = torch.tensor([[4.0, -4.0, 2.0, 1.9, 1.5, 1.4, -1.0, -1.2]])
    layer = _scored_layer("sigmoid", n_group=4, topk_group=2, top_k=2)
    layer.moe = layer.moe.model_copy(update={"balancing": "aux_free"})
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0]))  # lift group 3
    _, scores, chosen, weights = layer.route(logits)
    assert set(chosen[0].tolist()) <= {2, 3, 6, 7} and set(chosen[0].tolist()) & {6, 7}
    # The weights stay the unbiased scores (normalised): the bias chooses, it does not weigh.
    torch.testing.assert_close(weights[0], scores[0, chosen[0]] / scores[0, chosen[0]].sum())


def test_routed_scaling_factor_scales_the_routed_output_only() -> None:
    spec = make_spec(moe={"scoring": "sigmoid", "num_shared_experts": 1})
    layer = moe_layer(spec).eval()
    scaled = moe_layer(make_spec(moe={"scoring": "sigmoid", "num_shared_experts": 1, "routed_scaling_factor": 2.5}))
    scaled.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 32)
    assert layer.shared is not None
    shared = layer.shared(x)
    out, _ = layer(x)
    out_scaled, _ = scaled.eval()(x)
    torch.testing.assert_close(out_scaled - shared, 2.5 * (out - shared), atol=1e-5, rtol=1e-5)
