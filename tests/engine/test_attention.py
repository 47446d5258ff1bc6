"""Attention options: multi-head latent attention against a per-head reference, its compressed KV cache, and
grouped-query attention."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from workers.engine.estimate import kv_cache_bytes_per_token
from workers.engine.generation import generate
from workers.engine.kernels import rope_tables
from workers.engine.model import Attention, KVCache, LatentAttention, MoETransformer, build_model
from workers.engine.spec import Spec

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py

MLA = {"kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6}


def make_spec(**model: Any) -> Spec:
    m: dict[str, Any] = {
        "vocab_size": 300,
        "num_layers": 2,
        "hidden_size": 32,
        "num_heads": 4,
        "max_seq_len": 32,
        "moe": {"num_routed_experts": 4, "top_k": 2, "expert_hidden_size": 16},
        **model,
    }
    return Spec.model_validate({"model": m, "data": {"tokenizer": "bytes", "seq_len": 16}})


def _rotate_half(x: Tensor, pos: int, theta: float) -> Tensor:
    """The rotary map of one vector ``x`` ``(D,)`` at position ``pos``, written out pair by pair."""
    half = x.shape[0] // 2
    out = torch.empty_like(x)
    for i in range(half):
        angle = pos / theta ** (2 * i / x.shape[0])
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def reference_mla(attn: LatentAttention, x: Tensor, theta: float) -> Tensor:
    """DeepSeek-V2's multi-head latent attention one head and one position at a time: ``x`` ``(T, C)`` ->
    ``(T, C)``, causal, with plain matmuls on the module's weights."""
    T = x.shape[0]
    H, N, R, V, r = attn.num_heads, attn.nope, attn.rope, attn.v_dim, attn.rank

    def rms(v: Tensor, weight: Tensor, eps: float) -> Tensor:
        return v / torch.sqrt(v.pow(2).mean() + eps) * weight

    heads_out = []
    for h in range(H):
        queries, keys, values = [], [], []
        for t in range(T):
            q_in = x[t]
            if attn.q_down is not None and attn.q_norm is not None:
                q_in = rms(attn.q_down.weight @ x[t], attn.q_norm.weight, attn.q_norm.eps or 1e-6)
            q = attn.q_proj.weight[h * (N + R) : (h + 1) * (N + R)] @ q_in  # (N + R,)
            down = attn.kv_down.weight @ x[t]  # (r + R,)
            c = rms(down[:r], attn.kv_norm.weight, attn.kv_norm.eps or 1e-6)  # the latent
            up = attn.kv_up.weight[h * (N + V) : (h + 1) * (N + V)] @ c  # (N + V,)
            k_rope = _rotate_half(down[r:], t, theta)  # the same for every head
            queries.append(torch.cat((q[:N], _rotate_half(q[N:], t, theta))))
            keys.append(torch.cat((up[:N], k_rope)))
            values.append(up[N:])
        outputs = []
        for t in range(T):
            scores = torch.stack([queries[t] @ keys[s] for s in range(t + 1)]) / math.sqrt(N + R)
            weights = scores.softmax(0)
            outputs.append(sum(w * values[s] for s, w in enumerate(weights)))
        heads_out.append(torch.stack(outputs))  # (T, V)
    return torch.cat(heads_out, dim=1) @ attn.out.weight.T  # (T, H * V) -> (T, C)


def _mla_layer(spec: Spec, seed: int = 0) -> tuple[LatentAttention, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = build_model(spec)
    attn = model.blocks[0].attn
    assert isinstance(attn, LatentAttention)
    with torch.no_grad():
        for p in attn.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)  # large enough that attention is not uniform
            else:
                p.uniform_(0.5, 1.5)  # norm weights away from 1
    return attn, model.rope_cos, model.rope_sin


@pytest.mark.parametrize(
    "mla",
    [
        pytest.param({**MLA, "q_lora_rank": 0}, id="direct-query-narrow-values"),
        pytest.param({**MLA, "q_lora_rank": 10}, id="compressed-query"),
        pytest.param({**MLA, "v_head_dim": 20}, id="values-wider-than-keys"),
    ],
)
def test_latent_attention_and_its_gradients_match_a_per_head_reference(mla: dict[str, Any]) -> None:
    spec = make_spec(attention="mla", mla=mla)
    attn, cos, sin = _mla_layer(spec)
    T = 7
    x = torch.randn(1, T, 32, requires_grad=True)
    x_ref = x.detach().clone()[0].requires_grad_()
    out = attn(x, cos[:T], sin[:T])[0]
    ref = reference_mla(attn, x_ref, spec.model.rope_theta)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)

    grad_out = torch.randn_like(ref)
    names = ["x", *[n for n, _ in attn.named_parameters()]]
    params = list(attn.parameters())
    got = torch.autograd.grad(out, [x, *params], grad_out)
    want = torch.autograd.grad(ref, [x_ref, *params], grad_out)
    for g, w, name in zip(got, want, names, strict=True):
        torch.testing.assert_close(g.reshape(w.shape), w, atol=1e-5, rtol=1e-4, msg=name)


def test_the_rotary_key_comes_from_the_input_and_is_shared_by_every_head() -> None:
    """Decoupled RoPE: the rotary part of every head's key is one projection of the input per token, so the
    compressed cache keeps it once; the rope tables are as wide as that part, not as a head."""
    spec = make_spec(attention="mla", mla=MLA)
    model = build_model(spec)
    assert model.rope_cos.shape == (32, MLA["qk_rope_head_dim"] // 2)
    attn = model.blocks[0].attn
    assert isinstance(attn, LatentAttention)
    assert attn.kv_down.weight.shape == (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"], 32)
    assert attn.kv_up.weight.shape == (4 * (MLA["qk_nope_head_dim"] + MLA["v_head_dim"]), MLA["kv_lora_rank"])


def _logits_step_by_step(model: MoETransformer, ids: Tensor) -> tuple[Tensor, list[KVCache]]:
    """Logits ``(B, T, V)`` of a prompt of 3 tokens followed by the rest one token at a time through a KV cache."""
    caches = [KVCache() for _ in model.layers]
    x, _, _ = model.hidden_states(ids[:, :3], caches)
    steps = [x]
    for t in range(3, ids.shape[1]):
        x, _, _ = model.hidden_states(ids[:, t : t + 1], caches)
        steps.append(x)
    return F.linear(torch.cat(steps, dim=1), model.head_weight), caches


@pytest.mark.parametrize(
    "model",
    [
        pytest.param({}, id="mha"),
        pytest.param({"attention": "gqa", "num_kv_heads": 2}, id="gqa"),
        pytest.param({"attention": "mla", "mla": MLA}, id="mla"),
        pytest.param({"attention": "mla", "mla": {**MLA, "q_lora_rank": 10, "v_head_dim": 20}}, id="mla-wide-values"),
    ],
)
def test_cached_decoding_equals_the_uncached_forward_and_caches_what_the_estimator_says(model: dict[str, Any]) -> None:
    spec = make_spec(**model)
    torch.manual_seed(0)
    built = build_model(spec).eval()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        full = built(ids).logits
        stepped, caches = _logits_step_by_step(built, ids)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    cached = sum(c.nbytes for c in caches)
    assert cached == kv_cache_bytes_per_token(spec) * ids.numel()


def test_mla_caches_the_latent_not_keys_and_values() -> None:
    mha, mla = make_spec(), make_spec(attention="mla", mla=MLA)
    # MHA: keys and values of 4 heads of 8 per layer; MLA: a latent of 12 and a rotary key of 4 per layer.
    assert kv_cache_bytes_per_token(mha) == 2 * 2 * 4 * 8 * 4
    assert kv_cache_bytes_per_token(mla) == 2 * (12 + 4) * 4
    assert kv_cache_bytes_per_token(make_spec(attention="gqa", num_kv_heads=1)) == 2 * 2 * 1 * 8 * 4
    model = build_model(mla).eval()
    caches = [KVCache() for _ in model.layers]
    model.hidden_states(torch.randint(0, 300, (1, 5)), caches)
    assert caches[0].tensors is not None
    assert [tuple(t.shape) for t in caches[0].tensors] == [(1, 1, 5, 12), (1, 1, 5, 4)]


def test_mla_generation_with_the_compressed_cache_matches_full_recompute() -> None:
    torch.manual_seed(0)
    model = build_model(make_spec(attention="mla", mla={**MLA, "q_lora_rank": 10})).eval()
    prompt = torch.randint(0, 300, (2, 5))
    got = generate(model, prompt, 12, temperature=0.0)
    ids = prompt
    for _ in range(12):
        ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(got, ids)


def test_grouped_query_attention_equals_multi_head_attention_with_repeated_key_value_heads() -> None:
    gqa_spec = make_spec(attention="gqa", num_kv_heads=2)
    torch.manual_seed(0)
    gqa = Attention(gqa_spec.model)
    mha = Attention(make_spec().model)
    H, KV, D = 4, 2, 8
    with torch.no_grad():
        q, k, v = gqa.qkv.weight.split([H * D, KV * D, KV * D])
        # Query head h reads key/value head h // (H / KV): repeat each key/value head for its group.
        repeat = [w.view(KV, D, -1).repeat_interleave(H // KV, dim=0).reshape(H * D, -1) for w in (k, v)]
        mha.qkv.weight.copy_(torch.cat((q, *repeat)))
        mha.out.weight.copy_(gqa.out.weight)
    cos, sin = rope_tables(D, 16, 10000.0)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(gqa(x, cos[:9], sin[:9]), mha(x, cos[:9], sin[:9]), atol=1e-6, rtol=1e-5)
    assert gqa.qkv.weight.shape[0] == (H + 2 * KV) * D < mha.qkv.weight.shape[0]
