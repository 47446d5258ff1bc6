"""The engine's custom autograd functions and kernels: what ``workers.engine.model`` runs on.

Each one computes exactly what the plain PyTorch composition would (the model's tests compare them), with a
backward that allocates less or makes fewer passes:

- ``activate``: the feed-forward nonlinearity; SwiGLU's backward writes both halves of one gradient;
- ``rope_tables`` / ``apply_rope``: rotary position encoding whose backward is the same rotation by the
  opposite angle (no saved activations); ``rope_qkv``: the same on the fused q/k/v projection, whose backward
  writes the three gradients into one buffer;
- ``rms_norm``: RMSNorm in three passes forward (a norm reduction, two products) and few backward, saving the
  input and one scalar per row;
- ``grouped_matmul``: per-expert matmuls over rows sorted by expert, with ``torch.nn.functional.grouped_mm``
  where it applies and a loop where it does not (older torch, or a width whose row stride is not a multiple of
  16 bytes); a ``torch.library`` custom operator with its own backward, so ``torch.compile`` keeps it opaque;
- ``linear_cross_entropy``: the output head and its cross-entropy in one function, whose backward never holds
  the ``(N, V)`` gradient of the logits;
- ``head_loss``: the same loss without the logits (what a training step asks): the head's gradients are computed
  in the forward, a chunk of rows at a time, so no ``(N, V)`` tensor exists at all;
- ``Dropout``: ``nn.Dropout`` whose mask on a CPU comes from ``uniform_`` rather than ``bernoulli_`` (the same
  distribution; half the time).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

IGNORE_INDEX = -100  # targets the loss skips

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


# ----------------------------------------------------------------------------------------------------------
# Feed-forward activation
# ----------------------------------------------------------------------------------------------------------


class _SwiGLU(torch.autograd.Function):
    """``silu(h[..., :H]) * h[..., H:]`` with a backward that writes both halves of one gradient.

    Autograd's own backward of the two slices materialises two zero-filled full-width gradients and adds
    them; this one makes four elementwise passes and no zero fill.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, hidden: int) -> Tensor:
        ctx.save_for_backward(h)
        ctx.hidden = hidden
        return F.silu(h[..., :hidden]) * h[..., hidden:]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (h,) = ctx.saved_tensors
        gate, up = h[..., : ctx.hidden], h[..., ctx.hidden :]
        grad_h = torch.empty_like(h)
        torch.mul(grad, F.silu(gate), out=grad_h[..., ctx.hidden :])
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_h[..., : ctx.hidden])
        return grad_h, None


def activate(h: Tensor, activation: str, hidden: int) -> Tensor:
    """Apply the feed-forward nonlinearity to the input projection's output ``(..., in_width)``."""
    if activation == "swiglu":
        if torch.compiler.is_compiling():
            # Inductor fuses the plain composition, forward and backward; the hand-written backward's
            # ``out=`` writes into slices would break the graph.
            return F.silu(h[..., :hidden]) * h[..., hidden:]
        out: Tensor = _SwiGLU.apply(h, hidden)
        return out
    if activation == "gelu":
        return F.gelu(h)
    return F.relu(h)


# ----------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    """RMSNorm over the last dimension: ``x * rsqrt(mean(x^2) + eps) * weight``.

    On CPU, ``nn.RMSNorm`` decomposes into about 6 elementwise passes forward and 15 backward over the
    ``(N, C)`` input and keeps the normalised input for backward. This one reads ``x`` once for a norm
    reduction and writes the output in two products; the backward forms its two row and column sums as
    matrix-vector products of one ``g * x``. It saves the input and ``rstd`` ``(N, 1)`` only. Measured at
    2,048 x 256 fp32, forward and backward, 2 threads: 1.39 -> 0.65 ms under ``allocator.keep_freed_memory``
    (as training runs), 2.05 -> 0.70 ms with glibc's defaults; the ``make bench`` step at 8 experts 362 -> 355
    ms (nine norms).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        C = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(C).add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        C = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):  # the sums stay in fp32 whatever the caller runs under
            g, xs, r = grad.reshape(-1, C), x.reshape(-1, C), rstd.reshape(-1, 1)  # (N, C), (N, C), (N, 1)
            gx_ = g * xs  # (N, C)
            # Matrix-vector products (one read each; like the elementwise work, FLOP counters leave them out).
            grad_w = torch.mv(gx_.t(), r.view(-1)) if ctx.needs_input_grad[1] else None  # sum_n g x rstd
            grad_x = None
            if ctx.needs_input_grad[0]:
                # d/dx of x r w: r (g w) - x r^3 (sum_c g w x) / C
                coef = (r.pow(3) * torch.mv(gx_, weight).unsqueeze(1)).mul_(-1.0 / C)  # (N, 1)
                grad_x = torch.mul(g, r).mul_(weight).addcmul_(xs, coef).view(x.shape)
        return grad_x, grad_w, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``torch.nn.functional.rms_norm(x, (C,), weight, eps)`` with the pass-saving kernel above for fp32 ``x``
    and ``weight``; other dtypes, and code being compiled (Inductor fuses the plain composition), take
    PyTorch's own."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or torch.compiler.is_compiling():
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    out: Tensor = _RMSNorm.apply(x, weight, eps)
    return out


# ----------------------------------------------------------------------------------------------------------
# Rotary position encoding
# ----------------------------------------------------------------------------------------------------------


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``(max_len, head_dim // 2)`` for the rotate-half rotary encoding."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor | None = None) -> Tensor:
    """Rotate-half rotary map of ``x`` ``(B, T, H, D)`` by angles with ``cos``/``sin`` ``(T, 1, D/2)``, into
    ``out`` (any strides, the promoted dtype of ``x`` and ``cos``) or a new tensor."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)  # x2 cos + x1 sin
    return out


class _Rope(torch.autograd.Function):
    """Rotary encoding; a rotation's transpose is the rotation by the opposite angle, so the backward is
    the same kernel with ``-sin``: no saved activations and no autograd graph of slices and cats."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(B, T, H, D)`` by position; ``cos``/``sin`` are ``(T, D/2)`` for those positions."""
    if torch.compiler.is_compiling():
        # The plain composition, which Inductor fuses (forward and backward) into one pass each.
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    out: Tensor = _Rope.apply(x, cos[:, None, :], sin[:, None, :])  # tables broadcast over heads
    return out


class _RopeQKV(torch.autograd.Function):
    """The fused q/k/v projection's output split into heads, queries and keys rotated (``rope_qkv``).

    The backward writes the three gradients into one ``(B, T, W)`` buffer: autograd's own graph of a split and
    two slices would zero-fill and copy the queries' and keys' gradients into full-width tensors and then
    concatenate all three (measured at the ``make bench`` shape, 2,048 x 768, 1.5 ms of a layer's 19.6 ms of
    attention forward and backward).
    """

    @staticmethod
    def forward(
        ctx: Any, qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        B, T, W = qkv.shape
        x = qkv.view(B, T, heads + 2 * kv_heads, W // (heads + 2 * kv_heads))
        qk = _rotate(x[:, :, : heads + kv_heads], cos, sin)  # (B, T, H+KV, D): one pass for both
        ctx.save_for_backward(cos, sin)
        ctx.heads, ctx.kv_heads = heads, kv_heads
        v = x[:, :, heads + kv_heads :].transpose(1, 2)  # a view of the input: no copy
        return qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2), v

    @staticmethod
    def backward(ctx: Any, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor) -> tuple[Tensor, None, None, None, None]:
        cos, sin = ctx.saved_tensors
        H, KV = ctx.heads, ctx.kv_heads
        B, _, T, D = grad_q.shape
        grad = grad_v.new_empty(B, T, H + 2 * KV, D)  # the input's dtype (v's gradient has it)
        for g, heads in ((grad_q, slice(0, H)), (grad_k, slice(H, H + KV))):
            g = g.transpose(1, 2)  # (B, T, heads, D)
            if g.dtype == grad.dtype:
                _rotate(g, cos, -sin, out=grad[:, :, heads])
            else:  # autocast: rotated in fp32 like the forward, then cast
                grad[:, :, heads].copy_(_rotate(g, cos, -sin))
        grad[:, :, H + KV :].copy_(grad_v.transpose(1, 2))
        return grad.view(B, T, -1), None, None, None, None


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split a fused projection ``(B, T, (heads + 2 kv_heads) x D)`` into queries ``(B, heads, T, D)``, keys and
    values ``(B, kv_heads, T, D)``, with queries and keys rotated by position (``cos``/``sin`` ``(T, D/2)``).

    Queries and keys are in the promoted dtype of ``qkv`` and the tables (fp32 under autocast), values in
    ``qkv``'s; the same values and gradients as ``apply_rope`` on the split.
    """
    B, T, W = qkv.shape
    D = W // (heads + 2 * kv_heads)
    if torch.compiler.is_compiling():
        qk, v = qkv.split([(heads + kv_heads) * D, kv_heads * D], dim=-1)
        qk = apply_rope(qk.view(B, T, heads + kv_heads, D), cos, sin)
        return (
            qk[:, :, :heads].transpose(1, 2),
            qk[:, :, heads:].transpose(1, 2),
            v.view(B, T, kv_heads, D).transpose(1, 2),
        )
    q, k, v = _RopeQKV.apply(qkv, cos[:, None, :], sin[:, None, :], heads, kv_heads)
    return q, k, v


def count_per_expert(expert_of: Tensor, num_experts: int) -> Tensor:
    """``(E,)`` int64 number of entries of ``expert_of`` equal to each expert (``bincount`` with
    ``minlength=E``, whose output length depends on the data: ``torch.compile`` would break the graph there)."""
    return expert_of.new_zeros(num_experts).scatter_add_(0, expert_of, torch.ones_like(expert_of))


# ----------------------------------------------------------------------------------------------------------
# Grouped expert matmul
# ----------------------------------------------------------------------------------------------------------


def _grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    """grouped_mm needs every row stride to be a multiple of 16 bytes."""
    size = x.element_size()
    return _HAS_GROUPED_MM and (w.shape[1] * size) % 16 == 0 and (w.shape[2] * size) % 16 == 0


def _grouped_matmul_impl(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """``(M, K)`` rows sorted by group, ``(E, K, N)`` weights, ``(E,)`` rows per group -> ``(M, N)``."""
    if _grouped_mm_ok(x, w):
        return F.grouped_mm(x, w, offs=torch.cumsum(counts, dim=0, dtype=torch.int32))
    out = x.new_empty(x.shape[0], w.shape[2])
    for e, (xs, os) in enumerate(zip(x.split(counts.tolist()), out.split(counts.tolist()), strict=True)):
        if xs.shape[0]:
            torch.mm(xs, w[e], out=os)
    return out


def _grouped_matmul_backward_impl(grad: Tensor, x: Tensor, w: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad_x (M, K), grad_w (E, K, N))`` of ``grouped_matmul`` for the output gradient ``grad`` ``(M, N)``.

    An expert with no rows gets a zero weight gradient. Indexing ``w[e]`` happens outside autograd, so the
    weight gradient is written once as ``(E, K, N)`` instead of once per expert (O(E^2) memory traffic).
    """
    grad = grad.contiguous()  # grouped_mm's CPU kernel rejects stride-0 gradients (e.g. from ``y.sum()``)
    if _grouped_mm_ok(x, w):
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        # The transposes are views whose row strides grouped_mm accepts (K and N pass ``_grouped_mm_ok``).
        return F.grouped_mm(grad, w.transpose(-2, -1), offs=offs), F.grouped_mm(x.t(), grad, offs=offs)
    sizes = counts.tolist()
    grad_x = torch.empty_like(x)
    grad_w = torch.zeros_like(w)
    for e, (xs, gs, gxs) in enumerate(zip(x.split(sizes), grad.split(sizes), grad_x.split(sizes), strict=True)):
        if xs.shape[0]:
            torch.mm(gs, w[e].t(), out=gxs)
            torch.mm(xs.t(), gs, out=grad_w[e])
    return grad_x, grad_w


class _GroupedMatmul(torch.autograd.Function):
    """Eager autograd of ``grouped_matmul``: the same two functions as the custom operator below, without the
    operator's dispatch (~60 µs a call through ``torch.library``'s Python layer, forward and backward: 0.3 ms a
    MoE layer, 2% of the tiny demo's step)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
        ctx.save_for_backward(x, w, counts)
        return _grouped_matmul_impl(x, w, counts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, w, counts = ctx.saved_tensors
        grad_x, grad_w = _grouped_matmul_backward_impl(grad, x, w, counts)
        return grad_x, grad_w, None


# ``torch.compile`` sees the grouped matmul as one opaque operator (``moe_engine::grouped_matmul``) with a fake
# (shape-only) implementation and a registered backward: the whole model then traces into one graph. Traced
# through, ``grouped_mm``'s meta function demands bf16 operands (the CPU kernel takes fp32), and a
# ``torch._dynamo.disable`` wrapper breaks the graph around every expert matmul (measured slower than eager).
# Eager calls take ``_GroupedMatmul`` instead: the same functions without the operator's dispatch.


@torch.library.custom_op("moe_engine::grouped_matmul", mutates_args=())
def _grouped_matmul_op(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """``(M, K)`` rows sorted by group, ``(E, K, N)`` weights, ``(E,)`` rows per group -> ``(M, N)``."""
    return _grouped_matmul_impl(x, w, counts)


@_grouped_matmul_op.register_fake
def _grouped_matmul_fake(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("moe_engine::grouped_matmul_backward", mutates_args=())
def _grouped_matmul_backward_op(grad: Tensor, x: Tensor, w: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_w)`` of ``grouped_matmul`` (``_grouped_matmul_backward_impl``)."""
    return _grouped_matmul_backward_impl(grad, x, w, counts)


@_grouped_matmul_backward_op.register_fake
def _grouped_matmul_backward_fake(grad: Tensor, x: Tensor, w: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(w)


def _grouped_matmul_setup(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_matmul_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
    x, w, counts = ctx.saved_tensors
    grad_x, grad_w = _grouped_matmul_backward_op(grad, x, w, counts)
    return grad_x, grad_w, None


_grouped_matmul_op.register_autograd(_grouped_matmul_backward, setup_context=_grouped_matmul_setup)


# FLOP counts for torch.utils.flop_counter (the estimator's tests count the model's operations with it): an opaque
# operator hides the matmuls it runs. Every row meets one (K, N) weight: 2·M·K·N, and twice that backward.
@register_flop_formula(torch.ops.moe_engine.grouped_matmul)
def _grouped_matmul_flops(x_shape: Any, w_shape: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[2]


@register_flop_formula(torch.ops.moe_engine.grouped_matmul_backward)
def _grouped_matmul_backward_flops(grad_shape: Any, x_shape: Any, w_shape: Any, *args: Any, **kwargs: Any) -> int:
    return 4 * x_shape[0] * x_shape[1] * w_shape[2]


def grouped_matmul(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Rows of ``x`` ``(M, K)`` sorted by group, ``counts[e]`` rows for group ``e``; ``w`` is ``(E, K, N)``.

    Returns ``(M, N)`` with ``out[rows of e] = x[rows of e] @ w[e]``. ``counts`` must sum to ``M``. Runs
    ``torch.nn.functional.grouped_mm`` where it applies, else a loop of matmuls into one preallocated output.
    """
    if torch.compiler.is_compiling():
        traced: Tensor = _grouped_matmul_op(x, w, counts)
        return traced
    out: Tensor = _GroupedMatmul.apply(x, w, counts)
    return out


# ----------------------------------------------------------------------------------------------------------
# Cross-entropy over a large vocabulary
# ----------------------------------------------------------------------------------------------------------

# Elements per chunk of the (N, V) logits in the loss: temporaries stay ~2 MB, so they are reused from the
# allocator's heap and stay in cache instead of being fresh (N, V) buffers.
_CE_CHUNK_ELEMENTS = 1 << 19
# Rows per chunk of the output head's backward: ~8 MB of the logits' gradient at a time, enough rows for
# efficient matmuls, few enough that the chunk and the head's weight gradient stay in cache between chunks.
_HEAD_CHUNK_ELEMENTS = 1 << 21
# Rows per chunk of ``head_loss``: ~16 MB of logits and as much of their log-probabilities. Larger than the
# backward's chunk because each chunk also runs the logits' matmul, which loses ~20% at 256 rows against one
# (N, V) matmul and ~7% at 512 (measured at 2,048 × 256 × 8,192, fp32, 2 threads).
_HEAD_LOSS_CHUNK_ELEMENTS = 1 << 22


def _mean_nll(logits: Tensor, targets: Tensor, smoothing: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean (label-smoothed) NLL of ``logits`` ``(N, V)``, in fp32 chunk by chunk (fp32 logits: into one small
    reused buffer; lower-precision ones are upcast a chunk at a time).

    Returns ``(loss, safe targets (N,), valid (N,) bool, count of valid rows)``.
    """
    N, V = logits.shape
    rows = max(1, _CE_CHUNK_ELEMENTS // V)
    valid = targets != IGNORE_INDEX  # (N,)
    safe = torch.where(valid, targets, 0)  # (N,) in-range index for the ignored rows too
    buf = logits.new_empty(min(rows, N), V, dtype=torch.float32)  # log-probabilities of one chunk
    per_row = []
    for lg, tg in zip(logits.split(rows), safe.split(rows), strict=True):
        logp = buf[: lg.shape[0]]
        if lg.dtype == torch.float32:
            torch._log_softmax(lg, -1, False, out=logp)
        else:
            logp = torch.log_softmax(lg, -1, dtype=torch.float32)
        nll = -logp.gather(1, tg.unsqueeze(1)).squeeze(1)  # (rows,)
        if smoothing > 0:
            nll = (1.0 - smoothing) * nll - smoothing * logp.mean(dim=-1)
        per_row.append(nll)
    count = valid.sum().clamp(min=1).to(torch.float32)
    return torch.where(valid, torch.cat(per_row), 0.0).sum() / count, safe, valid, count


def _loss_grad(buf: Tensor, logits: Tensor, safe: Tensor, scale: Tensor, smoothing: float) -> Tensor:
    """d loss / d logits of one chunk ``(n, V)`` in fp32: (softmax - smoothed one-hot) * row scale.

    Written into ``buf`` (fp32, at least n rows) when the logits are fp32.
    """
    n, V = logits.shape
    if logits.dtype == torch.float32:
        g = buf[:n]
        torch._softmax(logits, -1, False, out=g)
    else:
        g = torch.softmax(logits, -1, dtype=torch.float32)
    g.mul_(scale.unsqueeze(1))
    if smoothing > 0:
        g.sub_((scale * (smoothing / V)).unsqueeze(1))
    g.scatter_add_(1, safe.unsqueeze(1), (-(1.0 - smoothing) * scale).unsqueeze(1))
    return g


class _LinearCrossEntropy(torch.autograd.Function):
    """``logits = x @ weight.T`` in ``dtype`` and their mean cross-entropy (computed in fp32), in one function.

    Same values and gradients as ``F.linear`` then ``F.cross_entropy(..., ignore_index=-100,
    label_smoothing=s)`` (but a loss of 0.0 rather than NaN when every target is ignored); in a lower
    precision, as autocast would compute them. The backward never holds the ``(N, V)`` gradient of the logits:
    chunk by chunk it computes the gradient of a few hundred rows and multiplies it straight into ``grad_x``
    and ``grad_weight``. Measured in the ``make bench`` step (2,048 × 8,192 fp32 logits): writing that 64 MB
    gradient afresh each step and reading it back for the two matmuls cost more than the matmuls; in bf16 or
    fp16 it also drops the logits' fp32 copy and fp32 gradient that autocast's path keeps. The logits are
    returned too and stay differentiable: a gradient that reaches them from elsewhere is added chunk by chunk.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, targets: Tensor, smoothing: float, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)  # no copies in fp32
            logits = torch.mm(xc, wc.t())  # (N, V)
            loss, safe, valid, count = _mean_nll(logits, targets, smoothing)
        ctx.save_for_backward(xc, wc, logits, safe, valid, count)
        ctx.smoothing = smoothing
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.set_materialize_grads(False)  # an unused logits output gives None, not an (N, V) zero tensor
        return loss, logits

    @staticmethod
    def backward(
        ctx: Any, grad_loss: Tensor | None, grad_logits: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        xc, wc, logits, safe, valid, count = ctx.saved_tensors
        N, V = logits.shape
        rows = max(1, _HEAD_CHUNK_ELEMENTS // V)
        if grad_loss is None:
            grad_loss = count.new_zeros(())
        row_scale = (grad_loss.float() / count) * valid.float()  # (N,) d loss / d per-row loss
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = xc.new_empty(N, xc.shape[1], dtype=ctx.x_dtype) if want_x else None  # (N, C)
        grad_w = None  # (V, C)
        if want_w:  # fp32: the first chunk writes it; a lower precision sums every chunk into zeros
            grad_w = wc.new_empty(wc.shape) if ctx.w_dtype == wc.dtype else wc.new_zeros(wc.shape, dtype=ctx.w_dtype)
        buf = logits.new_empty(min(rows, N), V, dtype=torch.float32)
        for start in range(0, N, rows):
            end = min(start + rows, N)
            g = _loss_grad(buf, logits[start:end], safe[start:end], row_scale[start:end], ctx.smoothing)
            if grad_logits is not None:
                g.add_(grad_logits[start:end])
            g = g.to(wc.dtype)  # (n, V): the matmuls run in the forward's precision
            if grad_x is not None:
                if grad_x.dtype == g.dtype:
                    torch.mm(g, wc, out=grad_x[start:end])  # (n, V) @ (V, C)
                else:
                    grad_x[start:end] = torch.mm(g, wc)
            if grad_w is not None and grad_w.dtype == g.dtype:
                # (V, n) @ (n, C), accumulated in place; beta 0 makes the first chunk ignore the empty buffer.
                grad_w.addmm_(g.t(), xc[start:end], beta=float(start > 0))
            elif grad_w is not None:
                grad_w.add_(torch.mm(g.t(), xc[start:end]))  # lower precision: the chunks summed in fp32
        return grad_x, grad_w, None, None, None


def linear_cross_entropy(
    x: Tensor, weight: Tensor, targets: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``(loss, logits)`` of the output head ``weight`` ``(V, C)`` on ``x`` ``(N, C)`` against ``targets`` ``(N,)``.

    The matmul runs in autocast's dtype when autocast is on (logits in that dtype, as ``F.linear`` gives), in
    ``x``'s otherwise; the loss is fp32. ``IGNORE_INDEX`` targets are ignored.
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    loss, logits = _LinearCrossEntropy.apply(x, weight, targets, label_smoothing, dtype)
    return loss, logits


class _HeadLoss(torch.autograd.Function):
    """The mean cross-entropy of ``x @ weight.T`` and, when asked, its gradients, all computed in the forward
    chunk by chunk: no ``(N, V)`` tensor exists at any time, only one chunk of a few hundred rows.

    The loss is a scalar that the caller only scales (a training step backpropagates ``loss / accum``), so its
    gradients are the forward's gradients times the incoming scalar: the backward multiplies the two saved
    gradients and hands them on. What that saves against ``_LinearCrossEntropy``: the ``(N, V)`` logits are not
    written out, read back for the loss and kept until the backward reads them again (64 MB a step at
    2,048 × 8,192 in fp32, a fresh mapping per step under glibc's default allocator settings).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        targets: Tensor,
        smoothing: float,
        dtype: torch.dtype,
        want_x: bool,
        want_w: bool,
    ) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)  # no copies in fp32
            N, V = xc.shape[0], wc.shape[0]
            rows = max(1, _HEAD_LOSS_CHUNK_ELEMENTS // V)
            valid = targets != IGNORE_INDEX  # (N,)
            safe = torch.where(valid, targets, 0)  # (N,) in-range index for the ignored rows too
            count = valid.sum().clamp(min=1).to(torch.float32)
            # log of d loss / d row loss: -inf on ignored rows, whose gradient exp(-inf) = 0 then drops out.
            log_scale = torch.where(valid, -torch.log(count), float("-inf"))  # (N,)
            grad_x = x.new_empty(N, x.shape[1]) if want_x else None  # (N, C)
            grad_w = None  # (V, C): fp32 weights and matmuls write it; a lower precision sums chunks into zeros
            if want_w:
                grad_w = weight.new_empty(weight.shape) if weight.dtype == dtype else weight.new_zeros(weight.shape)
            buf = xc.new_empty(min(rows, N), V, dtype=torch.float32)  # one chunk's logits, then its gradient
            buf2 = xc.new_empty(min(rows, N), V, dtype=torch.float32)  # and its log-probabilities
            row_loss = []
            for start in range(0, N, rows):
                end = min(start + rows, N)
                lg = buf[: end - start]  # (n, V)
                if dtype == torch.float32:
                    torch.mm(xc[start:end], wc.t(), out=lg)
                else:
                    lg.copy_(torch.mm(xc[start:end], wc.t()))  # the forward's precision, the loss's fp32
                logp = buf2[: end - start]
                torch._log_softmax(lg, -1, False, out=logp)
                nll = -logp.gather(1, safe[start:end].unsqueeze(1)).squeeze(1)
                if smoothing > 0:
                    nll = (1.0 - smoothing) * nll - smoothing * logp.mean(dim=-1)
                row_loss.append(nll)
                if grad_x is None and grad_w is None:
                    continue
                # d loss / d logits = (softmax - smoothed one-hot) * scale, with the scale folded into the exp.
                lg = torch.exp(logp.add_(log_scale[start:end].unsqueeze(1)), out=lg)
                scale = valid[start:end].float() / count
                if smoothing > 0:
                    lg.sub_((scale * (smoothing / V)).unsqueeze(1))
                lg.scatter_add_(1, safe[start:end].unsqueeze(1), (-(1.0 - smoothing) * scale).unsqueeze(1))
                g = lg.to(dtype)  # the matmuls run in the forward's precision
                if grad_x is not None:
                    if grad_x.dtype == dtype:
                        torch.mm(g, wc, out=grad_x[start:end])  # (n, V) @ (V, C)
                    else:
                        grad_x[start:end] = torch.mm(g, wc)
                if grad_w is not None and grad_w.dtype == dtype:
                    grad_w.addmm_(g.t(), xc[start:end], beta=float(start > 0))  # beta 0: the first chunk writes
                elif grad_w is not None:
                    grad_w.add_(torch.mm(g.t(), xc[start:end]))
            loss = torch.where(valid, torch.cat(row_loss), 0.0).sum() / count
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None, None, None]:
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss.float()
        if scale.device.type == "cpu" and float(scale) == 1.0:  # a loss backpropagated as it is: nothing to scale
            return grad_x, grad_w, None, None, None, None, None
        return (
            None if grad_x is None else grad_x * scale.to(grad_x.dtype),
            None if grad_w is None else grad_w * scale.to(grad_w.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def head_loss(x: Tensor, weight: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The mean cross-entropy of the output head ``weight`` ``(V, C)`` on ``x`` ``(N, C)`` against ``targets``
    ``(N,)``, as ``linear_cross_entropy``'s loss (same precision rules), without its logits.

    When autograd will want them (grad mode on and ``x`` or ``weight`` requiring grad) the gradients are computed
    in this call, chunk by chunk, and the backward only scales them (a loss that is never backpropagated has cost
    them for nothing). Nothing of size ``(N, V)`` is ever allocated.
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    grad = torch.is_grad_enabled()
    loss: Tensor = _HeadLoss.apply(
        x, weight, targets, label_smoothing, dtype, grad and x.requires_grad, grad and weight.requires_grad
    )
    return loss


# ----------------------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------------------


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same training/eval behaviour, same distribution: each element kept with
    probability ``1 - p`` and scaled by ``1 / (1 - p)``) whose CPU training forward draws the mask with
    ``uniform_`` and a comparison. On a CPU ``F.dropout`` draws it with ``bernoulli_``, one element at a time on
    one thread: 5.7 ms forward and backward for a 32 x 128 x 192 batch of activations against 3.0 ms this way (2
    threads; 5.6 against 3.5 on one), and a text-classifier step runs nine of them. The backward multiplies by the
    same saved mask (autograd). Elsewhere (CUDA's fused kernel), and in evaluation, it is ``nn.Dropout``."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.p >= 1.0:
            return super().forward(x)
        # (ge_ writes 1.0 where kept: the uniform draws become the scaled mask in place, one buffer in all.)
        scale = torch.empty(x.shape, dtype=torch.float32, device=x.device).uniform_().ge_(self.p)
        scale.mul_(1.0 / (1.0 - self.p))
        return x * scale.to(x.dtype)
