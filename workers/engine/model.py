"""The DeepSeek-style Mixture-of-Experts decoder-only transformer, built from a ``Spec``.

Layout per block (pre-norm): ``x + drop(attn(norm(x)))``, then ``x + drop(ffn(norm(x)))`` where ``ffn`` is a
dense feed-forward for the first ``moe.first_dense_layers`` blocks and a DeepSeekMoE layer after that.

DeepSeekMoE layer = shared experts (always on, one fused wider feed-forward) + fine-grained routed experts
chosen top-k by a router. Routing contract:

- ``logits = x @ W_gate.T / router_temperature`` in fp32 (also under autocast);
- ``scores = softmax(logits)`` or ``sigmoid(logits)``;
- the experts are chosen by ``topk(scores + bias)``; ``bias`` is a persistent fp32 buffer that only the
  ``aux_free`` balancing changes (it stays zero otherwise, so selection is plain ``topk(scores)``);
- outputs are weighted by the *unbiased* scores of the chosen experts. With sigmoid scores the chosen top-k
  weights are normalised to sum to 1 (DeepSeek-V3); with softmax they are kept as they are (DeepSeek-V2 with
  ``norm_topk_prob=False``): the kept probabilities then carry the router's confidence into the output.

Dispatch has no Python loop over tokens or experts: one stable sort of the (token, expert) assignments by
expert, one gather of the token rows, one ``torch.nn.functional.grouped_mm`` per projection on stacked
``(E, in, out)`` weights, one weighted ``index_add`` back (``workers.engine.kernels.grouped_matmul``). When
``grouped_mm`` cannot be used (older torch, or a width whose row stride is not a multiple of 16 bytes, which
the kernel requires) a custom autograd function runs the same per-expert matmuls into preallocated outputs, so
its backward still allocates each weight gradient once instead of once per expert.

Attention (``model.attention``): ``mha``/``gqa`` is ``Attention`` (one fused qkv projection, rotary keys,
``num_kv_heads`` key/value heads); ``mla`` is ``LatentAttention``, DeepSeek-V2/V3's multi-head latent attention
(see its docstring), whose KV cache holds a latent and one shared rotary key per token instead of keys and values.

Group-limited routing (``moe.n_group > 1``, DeepSeek-V3): the experts are split into ``n_group`` groups of
consecutive experts; a group's score is the sum of its two best selection scores (sigmoid scoring) or its best
one (softmax), selection scores being ``scores + bias``; only experts of the ``topk_group`` best groups can be
chosen. ``moe.routed_scaling_factor`` multiplies the chosen experts' weights (after the sigmoid normalisation),
so it scales the routed output and not the shared experts'.

Multi-token prediction (``model.mtp_depth = D > 0``, DeepSeek-V3): module ``d`` (1..D) combines the previous
hidden state ``h^{d-1}_t`` (``h^0``: the last block's output, before the final norm) with the embedding of token
``t + d``: ``h'_t = W [norm(h^{d-1}_t); norm(embed(x_{t+d}))]``, runs one block (the same kind as the model's
top block) and predicts token ``t + d + 1`` through its own final norm and the shared output head. The MTP loss
is the mean of the D cross-entropies; ``loss`` adds ``training.mtp_loss_weight`` times it. Generation and
inference never run the MTP modules. Their MoE layers' aux loss joins ``aux_loss`` and their routers' biases
are balanced like the others, but ``expert_load`` and ``dropped_fraction`` describe the main blocks only.

The autograd kernels (SwiGLU, rotary encoding, grouped matmul, the fused output head + cross-entropy) live in
``workers.engine.kernels``; sampling and generation in ``workers.engine.generation``.

Capacity (``moe.capacity_factor``, training mode only): each expert keeps at most
``ceil(capacity_factor * tokens * top_k / E)`` assignments per forward. Within an expert, assignments are
kept in order of decreasing routing weight; ties keep the lower flattened ``token * top_k + slot`` index
(a stable sort), so dropping is deterministic. A dropped assignment contributes nothing (the token keeps
its other experts, the shared experts and the residual path). Evaluation and generation never drop:
capacity exists to bound training cost, and dropping at inference would make outputs depend on batch-mates.
(So in training mode with capacity, a token's output can depend on other tokens, future ones included.)

Balancing: ``aux_loss`` adds ``aux_loss_coef * E * sum_i f_i * P_i`` per MoE layer (``f_i``: fraction of the
assignments routed to expert i before capacity; ``P_i``: mean score of expert i, sigmoid scores normalised
per token), which is ``aux_loss_coef`` when balanced. ``aux_free`` moves the bias outside autograd in
``update_router_biases``: ``bias += speed * sign(mean load - load)``, then centred, from the router's choices
(before capacity) summed over the training forwards since the last call. The router z-loss
``router_z_loss_coef * mean(logsumexp(logits)^2)`` (on the temperature-scaled logits) applies in any mode.
Every token is routed, padding included; the trainer masks padding out of the task loss only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from workers.engine.kernels import (
    IGNORE_INDEX,
    Dropout,
    activate,
    apply_rope,
    count_per_expert,
    grouped_matmul,
    head_loss,
    linear_cross_entropy,
    rms_norm,
    rope_qkv,
    rope_tables,
)
from workers.engine.spec import ModelSpec, MoESpec, Spec


@dataclass
class ModelOutput:
    """What ``MoETransformer.forward`` returns.

    ``expert_load`` rows are fractions of this forward's ``tokens * top_k`` assignments that each expert
    processed after capacity dropping, so a row sums to ``1 - dropped fraction of that layer`` (exactly 1
    without dropping). ``dropped_fraction`` is over all MoE layers together.
    """

    loss: Tensor | None  # task_loss + aux_loss (+ mtp_loss_weight * mtp_loss): what backward uses; None without labels
    logits: Tensor | None  # (B, T, V) for causal_lm, (B, num_labels) for classification; None: return_logits=False
    task_loss: Tensor | None
    aux_loss: Tensor  # scalar: balance loss + router z-loss summed over MoE layers
    expert_load: Tensor  # (num_moe_layers, num_routed_experts), detached
    dropped_fraction: Tensor  # scalar
    mtp_loss: Tensor | None = None  # mean cross-entropy of the MTP modules (unweighted); None without MTP or labels


# ----------------------------------------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (the same parameter and state dict) computed by ``kernels.rms_norm``: fewer passes on
    fp32 inputs, PyTorch's own otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None:
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps if self.eps is not None else torch.finfo(x.dtype).eps)


def _make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(spec.hidden_size, eps=spec.norm_eps)
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)


def ffn_in_width(activation: str, hidden: int) -> int:
    """Output width of a feed-forward's input projection: SwiGLU fuses its gate and up projections."""
    return 2 * hidden if activation == "swiglu" else hidden


class FeedForward(nn.Module):
    """A dense feed-forward (also the fused shared experts: ``hidden = num_shared * expert_hidden``)."""

    def __init__(self, d_model: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.hidden = hidden
        self.activation = activation
        self.w_in = nn.Linear(d_model, ffn_in_width(activation, hidden), bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (..., C) -> (..., C)
        return self.w_out(activate(self.w_in(x), self.activation, self.hidden))


class KVCache:
    """What one block keeps of the positions seen so far during generation: two tensors ``(B, heads, T_past, D)``
    that grow along the time axis. MHA/GQA: keys and values ``(B, KV, T, head_dim)``. MLA (the compressed
    cache): the normalised latent ``(B, 1, T, kv_lora_rank)`` and the rotated shared key
    ``(B, 1, T, qk_rope_head_dim)``."""

    def __init__(self) -> None:
        self.tensors: tuple[Tensor, Tensor] | None = None

    @property
    def length(self) -> int:
        return 0 if self.tensors is None else self.tensors[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held (both tensors)."""
        return 0 if self.tensors is None else sum(t.numel() * t.element_size() for t in self.tensors)

    def append(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions of both tensors; returns everything cached, the new positions included."""
        if self.tensors is None:
            self.tensors = (first, second)
        else:
            self.tensors = (torch.cat((self.tensors[0], first), dim=2), torch.cat((self.tensors[1], second), dim=2))
        return self.tensors


def _check_cache_step(cache: KVCache, T: int) -> None:
    if cache.length and T > 1:
        # SDPA's is_causal mask is top-left aligned, wrong for several new queries after a prefix.
        raise ValueError("a KV cache with a prefix accepts one new token at a time")


def causal_attention(q: Tensor, k: Tensor, v: Tensor, **options: Any) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **options)``, in fp32 when training under CPU autocast.

    CPU autocast runs SDPA in bf16, whose flash backward is slower than fp32's on this CPU (AMX): 49 ms against
    15 ms at the tiny demo's 8 x 4 heads x 128 positions x 32 dimensions, about even at 256 x 64 (``python -m
    bench.precision`` shows the whole step). Attention is a small share of the FLOPs; the projections around it
    stay in bf16. Inference (no gradient) keeps bf16, whose forward is the faster one.
    """
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options)
    return F.scaled_dot_product_attention(q, k, v, **options)


class Attention(nn.Module):
    """Causal self-attention with rotary positions and grouped-query key/value heads."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.kv_heads
        self.head_dim = spec.head_dim
        self.dropout = spec.attention_dropout
        # One fused projection for q, k and v: one matmul instead of three.
        qkv_width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv = nn.Linear(spec.hidden_size, qkv_width, bias=False)
        self.out = nn.Linear(self.num_heads * self.head_dim, spec.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = rope_qkv(self.qkv(x), cos, sin, H, KV)  # (B, H, T, D), (B, KV, T, D) twice
        if cache is not None:
            _check_cache_step(cache, T)
            k, v = cache.append(k, v)  # (B, KV, T_total, D)
        y = causal_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            # A single new query may see every cached position. Without a cache, causality is stated as a
            # constant (for one token it is the same): exporters trace T as a symbol, which SDPA refuses.
            is_causal=cache is None or T > 1,
            enable_gqa=KV != H,
        )  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3) with decoupled rotary encoding.

    Per token ``x`` ``(C,)``, with ``H`` heads, ``N = qk_nope_head_dim``, ``R = qk_rope_head_dim``,
    ``V = v_head_dim`` and ``r = kv_lora_rank``:

    - queries: ``q = W_q x`` (``q_lora_rank = 0``) or ``W_uq RMSNorm(W_dq x)``, ``(H, N + R)``; the last ``R`` of
      each head are rotated by position;
    - keys and values: ``[c, k_r] = W_dkv x`` with ``c`` ``(r,)`` the latent and ``k_r`` ``(R,)``;
      ``c = RMSNorm(c)``; ``[k_nope, v] = W_ukv c`` ``(H, N + V)``; every head's key is ``[k_nope_h; rot(k_r)]``:
      the rotary part is one per token, shared by all heads (it cannot be absorbed into a latent);
    - attention with scale ``1 / sqrt(N + R)``, causal, then ``W_o`` over the ``H × V`` outputs.

    Training and prefill up-project the latent into per-head keys and values. With a KV cache the block keeps
    only ``c`` and ``rot(k_r)`` per token (``r + R`` numbers instead of ``2 × H × head_dim``), and a decoding step
    absorbs ``W_uk`` into the query and ``W_uv`` into the output: it attends over the latents directly, as
    DeepSeek-V2's inference does. Both compute the same function (tests compare them).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        a = spec.mla
        C, H = spec.hidden_size, spec.num_heads
        self.num_heads = H
        self.nope, self.rope = a.qk_nope_head_dim, a.qk_rope_head_dim
        self.v_dim, self.rank = a.v_head_dim, a.kv_lora_rank
        self.scale = 1.0 / math.sqrt(self.nope + self.rope)
        self.dropout = spec.attention_dropout
        self.q_down: nn.Linear | None = None
        self.q_norm: nn.RMSNorm | None = None
        if a.q_lora_rank:
            self.q_down = nn.Linear(C, a.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(a.q_lora_rank, eps=spec.norm_eps)
        # The query projection proper: from the compressed query, or from the residual stream directly.
        self.q_proj = nn.Linear(a.q_lora_rank or C, H * (self.nope + self.rope), bias=False)
        self.kv_down = nn.Linear(C, self.rank + self.rope, bias=False)  # the latent and the shared rotary key
        self.kv_norm = nn.RMSNorm(self.rank, eps=spec.norm_eps)
        self.kv_up = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.out = nn.Linear(H * self.v_dim, C, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        H, N, R, V, r = self.num_heads, self.nope, self.rope, self.v_dim, self.rank
        q_in = x if self.q_down is None or self.q_norm is None else self.q_norm(self.q_down(x))
        q_nope, q_rope = self.q_proj(q_in).view(B, T, H, N + R).split([N, R], dim=-1)  # (B, T, H, N), (.., R)
        q_rope = apply_rope(q_rope, cos, sin)  # (B, T, H, R)
        latent, k_rope = self.kv_down(x).split([r, R], dim=-1)  # (B, T, r), (B, T, R)
        c_kv = self.kv_norm(latent)  # (B, T, r)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin)  # (B, T, 1, R): one rotary key for every head
        if cache is not None:
            _check_cache_step(cache, T)
            decoding = cache.length > 0
            c_all, k_rope_all = cache.append(c_kv.unsqueeze(1), k_rope.transpose(1, 2))  # (B, 1, S, r), (B, 1, S, R)
            if decoding:
                return self._attend_to_latents(q_nope, q_rope, c_all, k_rope_all)

        k_nope, v = self.kv_up(c_kv).view(B, T, H, N + V).split([N, V], dim=-1)  # (B, T, H, N), (B, T, H, V)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, T, H, N + R)
        k = torch.cat((k_nope, k_rope.expand(B, T, H, R)), dim=-1)  # (B, T, H, N + R)
        # The fused (flash) kernels need one head width for queries, keys and values; otherwise SDPA falls back
        # to materialising the (T, T) scores (measured on CPU at T=256: 4x slower). Zero padding changes
        # neither the scores nor the kept part of the output (as DeepSeek's own implementation does).
        width = max(N + R, V)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t for t in (q, k, v))
        y = causal_attention(
            q.transpose(1, 2),  # (B, H, T, width)
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,  # a prefill (the only cached call that gets here) starts at position 0
            scale=self.scale,
        )  # (B, H, T, width)
        return self.out(y[..., :V].transpose(1, 2).reshape(B, T, H * V))

    def _attend_to_latents(self, q_nope: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor) -> Tensor:
        """One decoding step over the compressed cache: ``q_nope`` ``(B, 1, H, N)``, ``q_rope`` ``(B, 1, H, R)``,
        ``c_kv`` ``(B, 1, S, r)``, ``k_rope`` ``(B, 1, S, R)`` -> ``(B, 1, C)``.

        ``q_nope · (W_uk c) = (W_uk^T q_nope) · c``: the query moves into the latent space, every head attends
        over the same latents (a single shared key/value head), and ``W_uv`` maps the attended latent to values.
        """
        B = q_nope.shape[0]
        H, N, V = self.num_heads, self.nope, self.v_dim
        w = self.kv_up.weight.view(H, N + V, self.rank)
        w_k, w_v = w[:, :N], w[:, N:]  # (H, N, r), (H, V, r)
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_k)  # (B, H, 1, r)
        q = torch.cat((q_latent, q_rope.transpose(1, 2)), dim=-1)  # (B, H, 1, r + R)
        k = torch.cat((c_kv, k_rope), dim=-1)  # (B, 1, S, r + R)
        o = F.scaled_dot_product_attention(q, k, c_kv, scale=self.scale, enable_gqa=True)  # (B, H, 1, r)
        y = torch.einsum("bhtr,hvr->bthv", o, w_v)  # (B, 1, H, V)
        return self.out(y.reshape(B, 1, H * V))


# ----------------------------------------------------------------------------------------------------------
# The DeepSeekMoE layer
# ----------------------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Scores experts per token. Holds the aux-free selection bias and the load accumulated for it."""

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, C)
        # Persistent: the bias is training state that a resumed run must continue from.
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        # Assignments per expert since the last bias update (summed over micro-batches); not state_dict
        # material because an update always follows the optimizer step that a checkpoint comes after.
        self.register_buffer("load_accum", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.bias: Tensor
        self.load_accum: Tensor

    def forward(self, x: Tensor, temperature: float) -> Tensor:  # (N, C) -> (N, E) fp32 logits
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x.float(), self.weight.float())
        return logits / temperature if temperature != 1.0 else logits

    @torch.no_grad()
    def update_bias(self, speed: float) -> None:
        """DeepSeek-V3 aux-free step: raise the bias of under-loaded experts, lower over-loaded ones."""
        load = self.load_accum.float()
        if load.sum() > 0:
            self.bias += speed * torch.sign(load.mean() - load)
            self.bias -= self.bias.mean()  # only differences matter; centring keeps the bias bounded
        self.load_accum.zero_()


@dataclass
class MoEStats:
    """Per-forward routing figures of one MoE layer (all detached except ``aux``)."""

    aux: Tensor  # scalar: balance loss + z-loss, differentiable
    routed: Tensor  # (E,) int64 assignments chosen by the router, before capacity
    kept: Tensor  # (E,) int64 assignments processed, after capacity


# oneDNN, which runs bf16 matmuls on CPU, builds (JIT-compiles) a kernel for every new matrix shape and caches
# it; the rows routed to an expert change every step, so unpadded expert matmuls in bf16 pay that build almost
# every time (measured: 1024-wide products of 300-700 rows reach 180 GFLOP/s with a fresh row count each call,
# 1,900 with a repeated one; fp32's kernels need no build). Padding every expert's rows to a multiple of this
# keeps the shapes few (cached after the first steps) for ~this/2 wasted rows per expert.
CPU_LOW_PRECISION_GROUP_ROWS = 32


def pad_expert_groups(token_of: Tensor, counts: Tensor, gate: Tensor, multiple: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pad every expert's group of assignment rows to a multiple of ``multiple`` rows.

    ``token_of`` ``(M,)`` is the token of each assignment row, grouped by expert with ``counts`` ``(E,)`` rows
    each, ``gate`` ``(M,)`` its routing weight. Returns them padded to ``(M',)`` and ``(E,)``: a padding row reads
    token 0 with a gate of 0, so it adds nothing to the output and no gradient anywhere.
    """
    padded = torch.div(counts + (multiple - 1), multiple, rounding_mode="floor") * multiple  # (E,)
    rows, padded_rows = token_of.shape[0], int(padded.sum())
    if padded_rows == rows:
        return token_of, counts, gate
    group = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts, output_size=rows)
    shift = torch.cumsum(padded - counts, 0) - (padded - counts)  # (E,) padding before each group
    dest = torch.arange(rows, device=token_of.device) + shift[group]  # (M,) row in the padded layout
    return (
        token_of.new_zeros(padded_rows).index_copy_(0, dest, token_of),
        padded,
        gate.new_zeros(padded_rows).index_copy(0, dest, gate),
    )


class MoEFeedForward(nn.Module):
    """DeepSeekMoE: shared experts + top-k of fine-grained routed experts (see the module docstring)."""

    def __init__(self, d_model: int, moe: MoESpec, activation: str) -> None:
        super().__init__()
        self.moe = moe
        self.activation = activation
        self.num_experts = moe.num_routed_experts
        self.top_k = moe.top_k
        self.hidden = moe.expert_hidden_size
        self.router = Router(d_model, self.num_experts)
        # Stacked expert weights in (in, out) layout so that grouped_mm multiplies without a transpose.
        in_width = ffn_in_width(activation, self.hidden)
        self.w_in = nn.Parameter(torch.empty(self.num_experts, d_model, in_width))  # (E, C, 2H or H)
        self.w_out = nn.Parameter(torch.empty(self.num_experts, self.hidden, d_model))  # (E, H, C)
        self.shared: FeedForward | None = None
        if moe.num_shared_experts > 0:
            self.shared = FeedForward(d_model, moe.num_shared_experts * self.hidden, activation)
        # Expert parallelism (``workers.engine.distributed``) sets this: it runs the routed rows on the device that
        # holds their expert, given (rows grouped by expert, rows per expert, w_in, w_out); None: all here.
        self.expert_dispatch: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Choose experts for ``x`` ``(N, C)``.

        Returns ``(logits (N, E), scores (N, E), chosen (N, k) int64, weights (N, k) fp32)``; the weights include
        ``routed_scaling_factor``.
        """
        moe = self.moe
        logits = self.router(x, moe.router_temperature)  # (N, E) fp32
        scores = logits.softmax(dim=-1) if moe.scoring == "softmax" else logits.sigmoid()
        if moe.n_group > 1 and moe.topk_group < moe.n_group:
            # The bias steers selection only; the weights stay the unbiased scores.
            selection = scores.detach() + self.router.bias if moe.balancing == "aux_free" else scores.detach()
            chosen = torch.topk(self._limit_to_groups(selection), self.top_k, dim=-1).indices  # (N, k)
            weights = scores.gather(1, chosen)  # (N, k)
        elif moe.balancing == "aux_free":
            chosen = torch.topk(scores.detach() + self.router.bias, self.top_k, dim=-1).indices  # (N, k)
            weights = scores.gather(1, chosen)  # (N, k)
        else:
            weights, chosen = torch.topk(scores, self.top_k, dim=-1)  # (N, k) each
        if moe.scoring == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if moe.routed_scaling_factor != 1.0:
            weights = weights * moe.routed_scaling_factor
        return logits, scores, chosen, weights

    def _limit_to_groups(self, selection: Tensor) -> Tensor:
        """``selection`` ``(N, E)`` with the experts outside each token's ``topk_group`` best groups at -inf."""
        moe = self.moe
        N, E = selection.shape
        grouped = selection.view(N, moe.n_group, E // moe.n_group)  # (N, G, E/G)
        if moe.scoring == "sigmoid":
            group_scores = grouped.topk(min(2, E // moe.n_group), dim=-1).values.sum(dim=-1)  # (N, G)
        else:
            group_scores = grouped.amax(dim=-1)  # (N, G)
        best = group_scores.topk(moe.topk_group, dim=-1).indices  # (N, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, E)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        N, E, k, moe = B * T, self.num_experts, self.top_k, self.moe
        flat = x.reshape(N, C)  # (N, C)
        logits, scores, chosen, weights = self.route(flat)

        expert_of = chosen.reshape(-1)  # (N*k,) expert of assignment a = token * k + slot
        routed = count_per_expert(expert_of, E)  # (E,)
        capacity = None
        if self.training and moe.capacity_factor is not None:
            capacity = math.ceil(moe.capacity_factor * N * k / E)
        if capacity is None or capacity >= N * k:
            # One stable sort: within an expert, assignments stay in token order.
            order = torch.argsort(expert_of, stable=True)  # (N*k,)
            kept = routed
        else:
            # Priority inside an expert: larger routing weight first, ties by assignment index.
            by_weight = torch.argsort(weights.detach().reshape(-1), descending=True, stable=True)
            order = by_weight[torch.argsort(expert_of[by_weight], stable=True)]  # sorted by expert
            starts = torch.cumsum(routed, 0) - routed  # (E,) first sorted position of each expert
            rank = torch.arange(N * k, device=x.device) - starts[expert_of[order]]
            order = order[rank < capacity]  # (M,) kept assignments, still grouped by expert
            kept = routed.clamp(max=capacity)

        token_of = torch.div(order, k, rounding_mode="floor")  # (M,)
        gate = weights.reshape(-1).index_select(0, order)  # (M,) routing weight of each kept assignment
        low_precision = torch.is_autocast_enabled(x.device.type)
        if low_precision and x.device.type == "cpu" and self.expert_dispatch is None:
            token_of, kept, gate = pad_expert_groups(token_of, kept, gate, CPU_LOW_PRECISION_GROUP_ROWS)
        xs = flat.index_select(0, token_of)  # (M, C) gathered token rows, grouped by expert
        w_in: Tensor = self.w_in
        w_out: Tensor = self.w_out
        if low_precision:
            # grouped_mm is not autocast-aware: cast to the autocast dtype ourselves.
            dtype = torch.get_autocast_dtype(x.device.type)
            xs, w_in, w_out = xs.to(dtype), w_in.to(dtype), w_out.to(dtype)
        if self.expert_dispatch is not None:
            ys = self.expert_dispatch(xs, kept, w_in, w_out)  # (M, C), computed where the experts live
        else:
            h = activate(grouped_matmul(xs, w_in, kept), self.activation, self.hidden)  # (M, H)
            ys = grouped_matmul(h, w_out, kept)  # (M, C)
        ys = ys * gate.unsqueeze(1).to(ys.dtype)
        out = torch.zeros(N, C, dtype=ys.dtype, device=x.device).index_add_(0, token_of, ys)  # (N, C)
        if self.shared is not None:
            out = out + self.shared(flat)
        out = out.view(B, T, C).to(x.dtype)

        aux = logits.new_zeros(())
        if moe.balancing == "aux_loss" and moe.aux_loss_coef > 0:
            # Switch/DeepSeek: E * sum_i f_i * P_i with f_i the fraction of assignments routed to expert i
            # (before capacity: the router's intent) and P_i its mean probability. 1.0 when balanced.
            probs = scores if moe.scoring == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
            f = routed.to(probs.dtype) / (N * k)
            aux = aux + moe.aux_loss_coef * E * torch.dot(f, probs.mean(dim=0))
        if moe.router_z_loss_coef > 0:
            aux = aux + moe.router_z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
        return out, MoEStats(aux=aux, routed=routed, kept=kept)


# ----------------------------------------------------------------------------------------------------------
# Blocks and the model
# ----------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block; its feed-forward is dense or a DeepSeekMoE layer."""

    def __init__(self, spec: ModelSpec, use_moe: bool) -> None:
        super().__init__()
        self.attn_norm = _make_norm(spec)
        self.attn: Attention | LatentAttention = LatentAttention(spec) if spec.attention == "mla" else Attention(spec)
        self.ffn_norm = _make_norm(spec)
        self.ffn: MoEFeedForward | FeedForward
        if use_moe:
            self.ffn = MoEFeedForward(spec.hidden_size, spec.moe, spec.activation)
        else:
            self.ffn = FeedForward(spec.hidden_size, spec.moe.resolved_dense_hidden_size, spec.activation)
        self.drop = Dropout(spec.dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None
    ) -> tuple[Tensor, MoEStats | None]:  # (B, T, C) -> (B, T, C)
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache))
        stats = None
        if isinstance(self.ffn, MoEFeedForward):
            y, stats = self.ffn(self.ffn_norm(x))
        else:
            y = self.ffn(self.ffn_norm(x))
        return x + self.drop(y), stats


class MTPModule(nn.Module):
    """One multi-token prediction depth (DeepSeek-V3; see the module docstring): ``(h_prev, embedding of the
    token d ahead)`` -> hidden state ``(B, T, C)`` before the module's own final ``norm``."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.hidden_norm = _make_norm(spec)
        self.embed_norm = _make_norm(spec)
        self.proj = nn.Linear(2 * spec.hidden_size, spec.hidden_size, bias=False)
        self.block = Block(spec, use_moe=spec.num_moe_layers > 0)
        self.norm = _make_norm(spec)

    def combine(self, h_prev: Tensor, embedded: Tensor) -> Tensor:  # (B, T, C) twice -> (B, T, C)
        return self.proj(torch.cat((self.hidden_norm(h_prev), self.embed_norm(embedded)), dim=-1))


class MoETransformer(nn.Module):
    """Decoder-only MoE transformer for ``causal_lm`` or sequence ``classification`` (see ``forward``)."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        m = spec.model
        self.spec = spec
        self.task = m.task
        self.embed = nn.Embedding(m.vocab_size, m.hidden_size)
        self.drop = Dropout(m.dropout)
        self.layers = nn.ModuleList(Block(m, use_moe=i >= m.moe.first_dense_layers) for i in range(m.num_layers))
        self.norm = _make_norm(m)
        self.lm_head: nn.Linear | None = None
        self.classifier: nn.Linear | None = None
        if m.task == "classification":
            assert m.num_labels is not None  # the spec's cross-field rules guarantee it
            self.classifier = nn.Linear(m.hidden_size, m.num_labels)
        elif not m.tie_embeddings:
            self.lm_head = nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        # Never run by generation; their parameters are trained (and checkpointed) like the rest.
        self.mtp = nn.ModuleList(MTPModule(m) for _ in range(m.mtp_depth))
        cos, sin = rope_tables(m.rope_dim, m.max_seq_len, m.rope_theta)
        # Not persistent: derived from the spec, so checkpoints need not carry them.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.rope_cos: Tensor
        self.rope_sin: Tensor
        self.gradient_checkpointing: bool = spec.training.gradient_checkpointing
        # compile_for_training(scope="blocks") fills it: block -> its compiled twin (the same parameters), which
        # training forwards run instead (evaluation and generation keep the eager block). Not state_dict material.
        self.compiled_blocks: dict[nn.Module, nn.Module] = {}
        self._init_weights(m)

    def _init_weights(self, m: ModelSpec) -> None:
        std = m.init_std
        # GPT-2 / DeepSeek: projections that write into the residual stream are scaled down by depth so
        # the stream's variance does not grow with the number of blocks.
        residual_std = std / math.sqrt(2 * m.num_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding | Router):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, MoEFeedForward):
                nn.init.normal_(module.w_in, 0.0, std)
                nn.init.normal_(module.w_out, 0.0, residual_std)
        for block in [*self.blocks, *(module.block for module in self.mtp_modules)]:
            nn.init.normal_(block.attn.out.weight, 0.0, residual_std)
            if isinstance(block.ffn, FeedForward):
                nn.init.normal_(block.ffn.w_out.weight, 0.0, residual_std)
            elif block.ffn.shared is not None:
                nn.init.normal_(block.ffn.shared.w_out.weight, 0.0, residual_std)

    # -- public helpers -----------------------------------------------------------------------------------

    @property
    def blocks(self) -> list[Block]:
        """``layers`` with their type (a property, so it follows any later replacement of a block)."""
        return [cast(Block, b) for b in self.layers]

    @property
    def mtp_modules(self) -> list[MTPModule]:
        """The multi-token prediction modules, depth 1 first."""
        return [cast(MTPModule, module) for module in self.mtp]

    @property
    def moe_layers(self) -> list[MoEFeedForward]:
        """The MoE feed-forwards of the main blocks, bottom to top (not the MTP modules')."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoEFeedForward)]

    def _all_moe_layers(self) -> list[MoEFeedForward]:
        """Every MoE feed-forward, the MTP modules' included (all of them balance their routers)."""
        blocks = [*self.blocks, *(module.block for module in self.mtp_modules)]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoEFeedForward)]

    def router_biases(self) -> dict[str, Tensor]:
        """``state_dict`` name -> router bias buffer (the live tensor), one per MoE layer."""
        return {name: buf for name, buf in self.named_buffers() if name.endswith("router.bias")}

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Apply the aux-free bias update from the loads accumulated since the last call, then reset them.

        Loads are accumulated by training-mode forwards only (evaluation does not steer routing) and count
        the router's choices before capacity dropping. A no-op (besides the reset) unless ``aux_free``.
        """
        moe = self.spec.model.moe
        for layer in self._all_moe_layers():
            if moe.balancing == "aux_free":
                layer.router.update_bias(moe.bias_update_speed)
            else:
                layer.router.load_accum.zero_()

    def set_dropout(self, p: float) -> None:
        """Set the residual and embedding dropout everywhere (attention dropout is unchanged)."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p

    # -- forward ------------------------------------------------------------------------------------------

    def hidden_states(
        self, input_ids: Tensor, caches: list[KVCache] | None = None
    ) -> tuple[Tensor, Tensor, list[MoEStats]]:
        """Run the blocks: ``(B, T)`` ids -> final-normed ``(B, T, C)``, summed aux loss, per-layer stats.

        With ``caches`` (generation), positions continue after the cached ones.
        """
        x, aux, stats = self._trunk(input_ids, caches)
        return self.norm(x), aux, stats

    def _rope(self, start: int, T: int) -> tuple[Tensor, Tensor]:
        """cos/sin tables ``(T, rope_dim / 2)`` of positions ``start .. start + T - 1``."""
        if start + T > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.rope_cos.shape[0]}")
        return self.rope_cos[start : start + T], self.rope_sin[start : start + T]

    def _run_block(
        self, block: Block, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None
    ) -> tuple[Tensor, MoEStats | None]:
        """One block, with gradient checkpointing when training asks for it; its routed load counted once."""
        training = self.training and torch.is_grad_enabled() and cache is None
        run = self.compiled_blocks.get(block, block) if training else block
        if self.gradient_checkpointing and training:
            x, stats = checkpoint(run, x, cos, sin, use_reentrant=False)
        else:
            x, stats = run(x, cos, sin, cache)
        # Accumulated here rather than inside the layer: checkpointing re-runs the layer's forward during
        # backward, which must not count the same tokens twice.
        if stats is not None and self.training and isinstance(block.ffn, MoEFeedForward):
            block.ffn.router.load_accum += stats.routed
        return x, stats

    def _trunk(self, input_ids: Tensor, caches: list[KVCache] | None = None) -> tuple[Tensor, Tensor, list[MoEStats]]:
        """The blocks' output ``(B, T, C)`` before the final norm, the summed aux loss and per-layer stats."""
        start = caches[0].length if caches else 0
        cos, sin = self._rope(start, input_ids.shape[1])  # (T, rope_dim/2)
        x = self.drop(self.embed(input_ids))  # (B, T, C)
        aux = x.new_zeros((), dtype=torch.float32)
        stats: list[MoEStats] = []
        for i, block in enumerate(self.blocks):
            x, layer_stats = self._run_block(block, x, cos, sin, caches[i] if caches else None)
            if layer_stats is not None:
                aux = aux + layer_stats.aux
                stats.append(layer_stats)
        return x, aux, stats

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        return_logits: bool = True,
    ) -> ModelOutput:
        """Run the model and, given labels, the loss.

        ``return_logits=False`` with labels (causal_lm; what a training step and validation ask): ``logits`` is
        None, and the head and its loss run as ``kernels.head_loss``, which never builds the ``(B, T, V)`` logits
        and, in grad mode, computes the head's gradients in the forward (the loss is then meant to be
        backpropagated, as a training step does). A classifier returns its ``(B, num_labels)`` logits either way.

        causal_lm: ``labels`` ``(B, T)`` aligned with ``input_ids`` (shifted here: position t predicts
        label t+1); ``IGNORE_INDEX`` (-100) is ignored. ``attention_mask`` is not needed (pads sit on the
        right, and causal attention never lets a real token see them); give pad labels -100. With
        ``mtp_depth > 0`` and labels, the MTP modules run too (``mtp_loss``; see the module docstring).
        classification: ``labels`` ``(B,)`` int64; ``attention_mask`` ``(B, T)`` with 1 for real tokens
        (pads on the right) picks the last real token, whose hidden state is pooled; None: the last token.
        """
        h, aux, stats = self._trunk(input_ids)  # (B, T, C) before the final norm
        x = self.norm(h)  # (B, T, C)
        B, T, _ = x.shape
        task_loss: Tensor | None = None
        mtp_loss: Tensor | None = None
        if self.classifier is not None:
            if attention_mask is None:
                last = torch.full((B,), T - 1, dtype=torch.long, device=x.device)
            else:
                last = (attention_mask.long().sum(dim=1) - 1).clamp(min=0)  # (B,)
            pooled = x[torch.arange(B, device=x.device), last]  # (B, C)
            logits = self.classifier(pooled)  # (B, num_labels)
            if labels is not None:
                task_loss = self._classification_loss(logits, labels)
        else:
            weight = self.head_weight
            if labels is not None:
                targets = self._lm_targets(labels).reshape(-1)
                smoothing = self.spec.training.label_smoothing
                if return_logits:
                    # Head and loss in one function: its backward never holds the (N, V) logits' gradient.
                    task_loss, flat = linear_cross_entropy(x.reshape(B * T, -1), weight, targets, smoothing)
                    logits = flat.view(B, T, -1)  # (B, T, V)
                else:
                    task_loss, logits = head_loss(x.reshape(B * T, -1), weight, targets, smoothing), None
                if self.mtp_modules:
                    mtp_loss, mtp_aux = self._mtp_loss(h, input_ids, labels)
                    aux = aux + mtp_aux
            else:
                logits = F.linear(x, weight)  # (B, T, V)

        loss = None if task_loss is None else task_loss + aux
        if loss is not None and mtp_loss is not None:
            loss = loss + self.spec.training.mtp_loss_weight * mtp_loss
        return ModelOutput(
            loss=loss,
            logits=logits,
            task_loss=task_loss,
            aux_loss=aux,
            expert_load=self._expert_load(stats),
            dropped_fraction=self._dropped_fraction(stats),
            mtp_loss=mtp_loss,
        )

    @property
    def head_weight(self) -> Tensor:
        """The output head's ``(V, C)`` weight: the embedding when tied (causal_lm)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def _mtp_loss(self, h: Tensor, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean cross-entropy over the MTP depths, their MoE aux loss)`` from the main blocks' output ``h``.

        Depth d works on the whole ``(B, T)`` grid: position t sees the embedding of token t + d (padded past
        the end) and is scored against label t + d + 1 (``IGNORE_INDEX`` past the end). Causal attention keeps
        the padded tail from reaching the scored positions, so this equals running each depth on the
        ``T - d`` positions that have a token ahead.
        """
        B, T = input_ids.shape
        cos, sin = self._rope(0, T)
        aux = h.new_zeros((), dtype=torch.float32)
        losses = []
        for d, module in enumerate(self.mtp_modules, start=1):
            ahead = F.pad(input_ids[:, d:], (0, d), value=0)  # (B, T): token t + d at position t
            targets = F.pad(labels[:, d + 1 :], (0, d + 1), value=IGNORE_INDEX)  # (B, T): label t + d + 1
            h, stats = self._run_block(module.block, module.combine(h, self.drop(self.embed(ahead))), cos, sin)
            if stats is not None:
                aux = aux + stats.aux
            # Only the loss: no (B, T, V) logits, and the head's gradients computed here, chunk by chunk.
            loss = head_loss(
                module.norm(h).reshape(B * T, -1),
                self.head_weight,
                targets.reshape(-1),
                self.spec.training.label_smoothing,
            )
            losses.append(loss)
        return torch.stack(losses).mean(), aux

    @staticmethod
    def _lm_targets(labels: Tensor) -> Tensor:
        """Position t predicts label t+1: shift the labels, not the logits (no copy of the (B, T, V) logits)."""
        return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)

    def _classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        training = self.spec.training
        logits = logits.float()
        if training.loss == "focal":
            # Focal loss (Lin et al.): down-weights confident examples; label smoothing does not apply.
            valid = labels != IGNORE_INDEX
            logp = F.log_softmax(logits[valid], dim=-1).gather(1, labels[valid].unsqueeze(1)).squeeze(1)
            return -((1.0 - logp.exp()).pow(training.focal_gamma) * logp).mean()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=training.label_smoothing)

    def _expert_load(self, stats: list[MoEStats]) -> Tensor:
        E = self.spec.model.moe.num_routed_experts
        if not stats:
            return torch.zeros(0, E, device=self.embed.weight.device)
        kept = torch.stack([s.kept for s in stats]).float()  # (L_moe, E)
        total = torch.stack([s.routed.sum() for s in stats]).float().unsqueeze(1)  # (L_moe, 1)
        return kept / total

    def _dropped_fraction(self, stats: list[MoEStats]) -> Tensor:
        if not stats:
            return torch.zeros((), device=self.embed.weight.device)
        routed = torch.stack([s.routed.sum() for s in stats]).sum()
        kept = torch.stack([s.kept.sum() for s in stats]).sum()
        return 1.0 - kept.float() / routed.float()


def build_model(spec: Spec) -> MoETransformer:
    """The model described by ``spec.model``, randomly initialised with ``spec.model.init_std``."""
    return MoETransformer(spec)


def compile_for_training(model: MoETransformer, scope: Literal["blocks", "model"] = "blocks") -> nn.Module:
    """``model`` compiled with ``torch.compile`` (TorchInductor, static shapes) for its training forwards.

    Returns a module with ``model``'s forward signature that shares its parameters and buffers; evaluation,
    generation and checkpoints see the eager model (its ``state_dict`` keys carry no ``_orig_mod.`` prefix, and a
    checkpoint loads into a compiled or an eager run alike). Compilation happens at the first training call
    (tens of seconds on a CPU); a new batch shape compiles again. Static shapes: a run feeds one batch shape.

    ``scope="blocks"`` (what ``training.compile`` runs): every transformer block is compiled on its own and
    training forwards run the compiled twins (``model.compiled_blocks``); dynamo reuses one block's compiled code
    for the others of the same kind (their parameters are graph inputs), so the compile time does not grow with
    depth, and the embedding and the fused output head keep their eager kernels (the head's chunked backward).
    ``"model"``: the whole forward as one graph (``model`` is returned wrapped, and stays eager itself).
    ``bench.compile`` measures both.
    """
    if scope == "model":
        compiled = torch.compile(model, dynamic=False)
        assert isinstance(compiled, nn.Module)  # compiling a module gives a module (OptimizedModule)
        return compiled
    for block in [*model.blocks, *(module.block for module in model.mtp_modules)]:
        twin = torch.compile(block, dynamic=False)
        assert isinstance(twin, nn.Module)
        model.compiled_blocks[block] = twin
    return model
