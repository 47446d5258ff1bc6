"""Parameter counts predicted from a spec without building the model.

Imported by the web tier, so it must not import torch. The arithmetic mirrors ``workers.engine.model``
exactly (a test compares it with ``numel`` of built models); change both together.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import ValidationError

from workers.engine.hardware import PRECISIONS, HardwareProfile
from workers.engine.spec import ModelSpec, Spec

Role = Literal["hidden_matrices", "expert_stacks", "other_matrices", "embeddings", "vectors"]


@dataclass(frozen=True)
class ParameterShape:
    """``count`` parameters of ``shape`` in ``component`` (a key of ``parameter_breakdown``), with their ``role``
    for the optimizers (``workers.engine.optimizers.split_parameters``: which of them Muon orthogonalises, which
    Adafactor factors)."""

    component: str
    role: Role
    shape: tuple[int, ...]
    count: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.count


def _ffn_in_width(activation: str, hidden: int) -> int:
    """SwiGLU's input projection is twice as wide (gate and up)."""
    return 2 * hidden if activation == "swiglu" else hidden


def _ffn_params(d_model: int, hidden: int, activation: str) -> int:
    """A feed-forward without biases."""
    return d_model * _ffn_in_width(activation, hidden) + hidden * d_model


def _norm_params(m: ModelSpec) -> int:
    return m.hidden_size if m.norm == "rmsnorm" else 2 * m.hidden_size  # LayerNorm has a bias


def _norm_shapes(m: ModelSpec, component: str, count: int) -> list[ParameterShape]:
    n = count * (1 if m.norm == "rmsnorm" else 2)  # LayerNorm has a bias
    return [ParameterShape(component, "vectors", (m.hidden_size,), n)] if n else []


def _attention_shapes(m: ModelSpec, component: str, norms: str) -> list[ParameterShape]:
    """One block's attention: its projections in ``component``, MLA's latent norms in ``norms``."""
    C, H = m.hidden_size, m.num_heads

    def matrix(out: int, inp: int) -> ParameterShape:
        return ParameterShape(component, "hidden_matrices", (out, inp))

    if m.attention != "mla":
        KV, D = m.kv_heads, m.head_dim
        return [matrix((H + 2 * KV) * D, C), matrix(C, H * D)]
    a = m.mla
    qk = H * (a.qk_nope_head_dim + a.qk_rope_head_dim)
    shapes: list[ParameterShape] = []
    if a.q_lora_rank:
        shapes += [matrix(a.q_lora_rank, C), ParameterShape(norms, "vectors", (a.q_lora_rank,))]
    shapes += [
        matrix(qk, a.q_lora_rank or C),
        matrix(a.kv_lora_rank + a.qk_rope_head_dim, C),
        ParameterShape(norms, "vectors", (a.kv_lora_rank,)),
        matrix(H * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank),
        matrix(C, H * a.v_head_dim),
    ]
    return shapes


def _ffn_shapes(m: ModelSpec, component: str, hidden: int) -> list[ParameterShape]:
    C = m.hidden_size
    return [
        ParameterShape(component, "hidden_matrices", (_ffn_in_width(m.activation, hidden), C)),
        ParameterShape(component, "hidden_matrices", (C, hidden)),
    ]


def _block_shapes(m: ModelSpec, use_moe: bool, mtp: bool = False) -> list[ParameterShape]:
    """One transformer block (an MTP module's block: every part in ``mtp``)."""
    moe, C = m.moe, m.hidden_size

    def part(name: str) -> str:
        return "mtp" if mtp else name

    shapes = _norm_shapes(m, part("norms"), 2) + _attention_shapes(m, part("attention"), part("norms"))
    if not use_moe:
        return shapes + _ffn_shapes(m, part("dense_ffn"), moe.resolved_dense_hidden_size)
    E, H = moe.num_routed_experts, moe.expert_hidden_size
    shapes += [
        ParameterShape(part("router"), "other_matrices", (E, C)),
        ParameterShape(part("routed_experts"), "expert_stacks", (E, C, _ffn_in_width(m.activation, H))),
        ParameterShape(part("routed_experts"), "expert_stacks", (E, H, C)),
    ]
    if moe.num_shared_experts:
        shapes += _ffn_shapes(m, part("shared_experts"), moe.num_shared_experts * H)
    return shapes


def parameter_shapes(spec: Spec) -> list[ParameterShape]:
    """Every parameter of ``build_model(spec)`` by shape (a tied matrix once), grouped by component and role."""
    m = spec.model
    C = m.hidden_size
    shapes = [ParameterShape("embedding", "embeddings", (m.vocab_size, C))]
    for i in range(m.num_layers):
        shapes += _block_shapes(m, use_moe=i >= m.moe.first_dense_layers)
    shapes += _norm_shapes(m, "norms", 1)
    if m.task == "classification":
        assert m.num_labels is not None  # guaranteed by the spec's cross-field rules
        shapes += [
            ParameterShape("head", "other_matrices", (m.num_labels, C)),
            ParameterShape("head", "vectors", (m.num_labels,)),
        ]
    elif not m.tie_embeddings:
        shapes.append(ParameterShape("head", "other_matrices", (m.vocab_size, C)))
    for _ in range(m.mtp_depth):
        shapes += _norm_shapes(m, "mtp", 2)  # the previous hidden state's and the embedding's
        shapes.append(ParameterShape("mtp", "hidden_matrices", (C, 2 * C)))
        shapes += _block_shapes(m, use_moe=m.num_moe_layers > 0, mtp=True)
        shapes += _norm_shapes(m, "mtp", 1)  # before the shared head
    return shapes


COMPONENTS = (
    "embedding",
    "attention",
    "dense_ffn",
    "routed_experts",
    "shared_experts",
    "router",
    "norms",
    "head",
    "mtp",
)


def parameter_breakdown(spec: Spec) -> dict[str, int]:
    """Parameters by component, plus the totals that matter for cost.

    Keys: ``embedding``, ``attention``, ``dense_ffn``, ``routed_experts``, ``shared_experts``, ``router``,
    ``norms``, ``head`` (components of the main model, summed over layers; ``head`` is 0 when tied to the
    embedding; MLA's latent norms are in ``norms``), ``mtp`` (every parameter of the multi-token prediction
    modules, which only training runs) and:

    - ``total``: every distinct parameter (a tied matrix once) = ``sum(p.numel() for p in parameters())``;
    - ``active``: parameters one trained token uses: everything except the routed experts it is not sent to
      (``num_routed_experts - top_k`` per MoE layer, the MTP modules' included); embeddings counted once;
    - ``active_matmul``: the main model's active parameters that take part in a matrix multiply per token,
      the basis of FLOP estimates: ``active`` minus the input embedding (a lookup), the norms (elementwise) and
      the MTP modules, plus the output projection when it is tied (the shared matrix is then used twice:
      looked up and multiplied).
    """
    m = spec.model
    moe = m.moe
    out = dict.fromkeys(COMPONENTS, 0)
    for shape in parameter_shapes(spec):
        out[shape.component] += shape.numel
    total = sum(out.values())
    one_expert = _ffn_params(m.hidden_size, moe.expert_hidden_size, m.activation)
    main_inactive = m.num_moe_layers * (moe.num_routed_experts - moe.top_k) * one_expert
    mtp_inactive = (m.mtp_depth if m.num_moe_layers else 0) * (moe.num_routed_experts - moe.top_k) * one_expert
    if m.task == "classification":
        assert m.num_labels is not None
        head_matmul = m.hidden_size * m.num_labels
    else:
        head_matmul = m.vocab_size * m.hidden_size
    active_matmul = (
        out["attention"]
        + out["dense_ffn"]
        + (out["routed_experts"] - main_inactive)
        + out["shared_experts"]
        + out["router"]
        + head_matmul
    )
    return {**out, "total": total, "active": total - main_inactive - mtp_inactive, "active_matmul": active_matmul}


def count_parameters(spec: Spec) -> int:
    """Exact number of parameters of ``build_model(spec)`` (a tied matrix counted once)."""
    return parameter_breakdown(spec)["total"]


def active_parameters(spec: Spec) -> int:
    """Parameters used per token: shared experts and ``top_k`` routed experts, embeddings counted once."""
    return parameter_breakdown(spec)["active"]


# ==========================================================================================================
# Cost prediction: FLOPs, memory, step time and out-of-memory risk on a hardware profile
# ==========================================================================================================
#
# Pure Python like the rest of this module (the web tier calls it on every keystroke). ``estimate(spec,
# hardware)`` gathers everything; its parts (``flops_per_token``, ``activation_bytes_per_token``,
# ``estimate_memory``, ``estimate_time``, ``suggest_memory_fixes``) are public for tests and callers.
#
# The memory model mirrors what ``workers.engine.model`` saves for backward (a test walks the autograd graph of
# built models and compares) under the training loop's contract (``workers.engine.train``): parameters, gradients
# and optimizer state in fp32 (how much state depends on the optimizer: ``optimizer_state_elements``); autocast
# for bf16/fp16, whose low-precision weight copies are cached through the
# forward and saved for backward (with checkpointing, re-made one block at a time). The peak is weights +
# gradients + optimizer state + activations (+ the allocator's overhead on them) + the runtime: a real CPU run's
# peak resident set matches that sum within a few percent (tests/engine/test_estimate_costs.py), because
# the allocator does not hand memory freed by backward back in time for the gradients.

_FP32 = 4
_INT64 = 8
# Memory traffic of one optimizer step per parameter, all fp32, with gradient clipping (a norm read and a scale)
# and zeroing: AdamW reads p, g, m, v and writes p, m, v (28 B), ~48 B in all. The others are scaled from their
# optimizer phase measured beside fused AdamW's at the bench shape (17.8M parameters, `python -m bench.engine
# --deepseek-only`): SGD with momentum (foreach) took as long as fused AdamW (48 ms), Adafactor (foreach: squares,
# row and column means, the update's RMS and clipping, the parameter's RMS) 2.6x as long. Muon's matrices read
# g, b and write b, p (plus AdamW's 48 B for the rest, and its bf16 Newton-Schulz matmuls, counted as FLOPs).
_OPTIMIZER_TRAFFIC_BYTES = {"adamw": 48, "sgd": 48, "adafactor": 126, "muon": 36}
# Elementwise work (norms, activations, rotary, routing gathers) is bandwidth-bound, not FLOP-bound: each
# saved activation byte costs about two bytes of traffic over the step (fitted on the reference CPU).
_ACTIVATION_TRAFFIC_FACTOR = 2
FITS_BELOW = 0.85  # fraction of a device's memory under which a run "fits"; up to 1.0 it is "tight"

# ddp: every device holds the whole model; expert: routed experts sharded over the devices (the rest ddp);
# fsdp: parameters, gradients and optimizer state sharded over the devices (FSDP2).
Parallelism = Literal["ddp", "expert", "fsdp"]
RiskLevel = Literal["fits", "tight", "will_not_fit"]


def _act_bytes(precision: str) -> int:
    """Bytes of an element that autocast computes in the low precision (matmul outputs and their users)."""
    return 2 if precision in ("bf16", "fp16") else _FP32


def _norm_saved(m: ModelSpec) -> int:
    """fp32 elements per token a normalisation saves, its output included (read by the next matmul).

    RMSNorm (``workers.engine.kernels.rms_norm``): input, rstd and the output; LayerNorm: input, mean and rstd
    and the output.
    """
    C = m.hidden_size
    return 2 * C + 1 if m.norm == "rmsnorm" else 2 * C + 2


def _ffn_saved(activation: str, hidden: int) -> int:
    """Elements per row a feed-forward saves after its input projection: the projection's output (that the
    activation's backward reads) and the activation's output (the input of the output projection)."""
    in_width = 2 * hidden if activation == "swiglu" else hidden
    return in_width + hidden


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes saved for backward per token: one attention sub-block, one MoE or dense feed-forward sub-block,
    the head and loss (``head``), and an MTP module's parts outside its block (``mtp_outside_block``; its block
    saves ``mtp_block``).
    ``checkpoint_input`` is what gradient checkpointing keeps per token per layer (the block input)."""

    attention: float
    moe: float
    dense: float
    head: float
    checkpoint_input: float
    expert_rows: float  # of ``moe``: the part proportional to routed rows (top_k of them per token)
    mtp_outside_block: float = 0.0  # one MTP module without its block: norms, projection, its head and loss
    mtp_block: float = 0.0  # one MTP module's block (the same kind as the model's top block)


def activation_bytes_per_token(spec: Spec, precision: str | None = None) -> ActivationBytes:
    """Saved activations per token by component, for ``precision`` (default: the spec's)."""
    m, moe, t = spec.model, spec.model.moe, spec.training
    p = precision or t.precision
    low = _act_bytes(p)
    cast_copy = low if low != _FP32 else 0  # autocast saves a low-precision copy of a fp32 matmul input
    C, H, KV, D = m.hidden_size, m.num_heads, m.kv_heads, m.head_dim
    T = spec.data.seq_len
    # A dropout keeps its mask: CUDA's fused kernel one byte per element, the CPU's the scaled noise in the
    # input's dtype (fp32 on the residual stream). The estimate takes the larger.
    mask = _FP32 if m.dropout > 0 else 0

    if m.attention == "mla":
        attention = _FP32 * _norm_saved(m) + H * _FP32 + mask * C + _latent_attention_saved(m, low, cast_copy)
    else:
        attention = (
            _norm_saved(m) * _FP32
            + cast_copy * C
            + (H + 2 * KV) * D * low  # the fused qkv output (values are read from it)
            + (H + KV) * D * (_FP32 if cast_copy else low)  # rotated queries and keys (fp32 tables promote)
            + cast_copy * (H + KV) * D  # attention's low-precision copy of them
            + H * D * low  # attention output, the out projection's input
            + H * _FP32  # log-sum-exp per head
            + mask * C
        )
    if m.attention_dropout > 0:
        # The math path keeps the attention probabilities, their dropout mask and the dropped probabilities.
        attention += H * T * (2 * low + 1) / 2  # causal: on average half the row is kept

    k = moe.top_k
    rows = k * (3 * C * low + _ffn_saved(m.activation, moe.expert_hidden_size) * low + _FP32) + 3 * k * _INT64
    shared = 0
    if moe.num_shared_experts:
        shared = _ffn_saved(m.activation, moe.num_shared_experts * moe.expert_hidden_size) * low
    router = moe.num_routed_experts * _FP32 * (2 if moe.router_z_loss_coef > 0 else 1)
    moe_bytes = _norm_saved(m) * _FP32 + cast_copy * C + router + rows + shared + mask * C
    dense = (
        _norm_saved(m) * _FP32
        + cast_copy * C
        + _ffn_saved(m.activation, moe.resolved_dense_hidden_size) * low
        + mask * C
    )

    head: float = _INT64 + mask * C  # the ids (the embedding's indices)
    if m.task == "causal_lm":
        # A training step's head + loss (workers.engine.kernels.head_loss) computes the head's gradients in the
        # forward and keeps only them: the input's (N, C), fp32 as the norm's output, and the weight's (V, C) in
        # fp32 once per micro-batch, spread over its tokens here. No logits, targets or low-precision input, and
        # nothing keeps the final norm's output.
        head += (_norm_saved(m) - C) * _FP32 + C * _FP32 + m.vocab_size * C * _FP32 / (t.batch_size * T)
    else:
        head += _norm_saved(m) * _FP32 + cast_copy * C + _INT64  # the norm, the classifier's input copy, the labels
    mtp_outside = 0.0
    if m.mtp_depth:
        # Two norms and the concatenation the projection reads, the token ids ahead (the embedding's indices),
        # and a head like the main one (its final norm, the logits, the targets).
        mtp_outside = 2 * _norm_saved(m) * _FP32 + 2 * C * (low + cast_copy) + _INT64 + mask * C + head - _INT64
    return ActivationBytes(
        attention=float(attention),
        moe=float(moe_bytes),
        dense=float(dense),
        head=float(head),
        checkpoint_input=float(C * _FP32),
        expert_rows=float(rows),
        mtp_outside_block=float(mtp_outside),
        mtp_block=float(attention + (moe_bytes if m.num_moe_layers else dense)) if m.mtp_depth else 0.0,
    )


def _latent_attention_saved(m: ModelSpec, low: int, cast_copy: int) -> float:
    """Bytes per token multi-head latent attention saves between its input norm and its output projection."""
    a, H = m.mla, m.num_heads
    r, R, N, V = a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim, a.v_head_dim
    saved = 2 * cast_copy * m.hidden_size  # the query and latent projections each read the normed input
    if a.q_lora_rank:
        q = a.q_lora_rank
        saved += q * low + (2 * q + 1) * _FP32 + cast_copy * q  # compressed query, its norm, its cast
    saved += (r + R) * low  # the latent and rotary key (the latent norm reads the whole projection output)
    saved += (2 * r + 1) * _FP32 + cast_copy * r  # the latent's norm (normalised input, rstd, output), its cast
    # Queries, keys and values are zero-padded to one head width for the fused attention kernel.
    width = H * max(N + R, V)
    # Values: the up-projection's output (values are a view of it), or their padded copy.
    saved += (H * (N + V) if width == H * V else width) * low
    saved += 2 * width * (_FP32 if cast_copy else low)  # queries and keys, rotary parts joined (fp32 tables promote)
    saved += cast_copy * 2 * width  # attention's low-precision copies of them
    saved += width * low  # attention output
    saved += 0 if width == H * V else H * V * low  # its unpadded part, the out projection's input
    return float(saved)


@dataclass(frozen=True)
class FlopsPerToken:
    """Floating-point operations per trained token (a multiply-add is 2). ``attention_forward`` is the part
    of ``forward`` spent on scores and weighted values (causal: each query sees (T+1)/2 keys on average)."""

    forward: float
    backward: float
    recompute: float  # the blocks' forward again with gradient checkpointing, but for each block's last matmul
    attention_forward: float
    training: float  # forward + backward + recompute


def _attention_score_flops(m: ModelSpec, T: int) -> float:
    """Forward FLOPs per token of one block's attention scores and weighted values (causal: a query sees
    (T + 1) / 2 keys on average)."""
    if m.attention == "mla":
        # Keys and values are zero-padded to one width for the fused kernel, which then does that much work.
        qk = v = max(m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim, m.mla.v_head_dim)
    else:
        qk = v = m.head_dim
    return 2 * m.num_heads * (qk + v) * (T + 1) / 2  # QK^T and AV


def flops_per_token(spec: Spec, checkpointing: bool | None = None) -> FlopsPerToken:
    """FLOPs per token of a training step (backward = 2 × forward: gradients of inputs and of weights).

    Multi-token prediction adds per module its projection, one block of the top block's kind and the output
    head again."""
    m, moe = spec.model, spec.model.moe
    b = parameter_breakdown(spec)
    T = spec.data.seq_len
    ckpt = spec.training.gradient_checkpointing if checkpointing is None else checkpointing
    one_expert = _ffn_params(m.hidden_size, moe.expert_hidden_size, m.activation)
    active_routed = b["routed_experts"] - m.num_moe_layers * (moe.num_routed_experts - moe.top_k) * one_expert
    blocks_matmul = b["attention"] + b["dense_ffn"] + active_routed + b["shared_experts"] + b["router"]
    attention = m.num_layers * _attention_score_flops(m, T)
    if m.task == "causal_lm":
        head: float = 2 * m.vocab_size * m.hidden_size
    else:
        assert m.num_labels is not None
        head = 2 * m.hidden_size * m.num_labels / T  # one pooled token per sequence
    # What the block of each kind leaves out of a recompute: PyTorch's non-reentrant checkpoint stops once
    # backward has every tensor it needs, so the block's last matmul (the dense or shared experts' output
    # projection, whose output nothing saves) is not run again.
    dense_trailing = moe.resolved_dense_hidden_size * m.hidden_size
    moe_trailing = moe.num_shared_experts * moe.expert_hidden_size * m.hidden_size
    blocks_forward = 2 * blocks_matmul + attention
    trailing = (m.num_layers - m.num_moe_layers) * dense_trailing + m.num_moe_layers * moe_trailing

    mtp_forward = 0.0
    if m.mtp_depth:
        attention_per_layer = b["attention"] / max(1, m.num_layers)
        if m.num_moe_layers:
            ffn = moe.top_k * one_expert + b["shared_experts"] / m.num_moe_layers + b["router"] / m.num_moe_layers
            block_trailing = moe_trailing
        else:
            ffn = _ffn_params(m.hidden_size, moe.resolved_dense_hidden_size, m.activation)
            block_trailing = dense_trailing
        mtp_block = 2 * (attention_per_layer + ffn) + _attention_score_flops(m, T)
        mtp_forward = m.mtp_depth * (mtp_block + 2 * 2 * m.hidden_size * m.hidden_size + head)
        blocks_forward += m.mtp_depth * mtp_block  # (for the recompute below)
        trailing += m.mtp_depth * block_trailing
        attention += m.mtp_depth * _attention_score_flops(m, T)
    forward = 2 * blocks_matmul + m.num_layers * _attention_score_flops(m, T) + head + mtp_forward
    backward = 2 * forward
    recompute = blocks_forward - 2 * trailing if ckpt else 0.0
    return FlopsPerToken(
        forward=float(forward),
        backward=float(backward),
        recompute=float(recompute),
        attention_forward=float(attention),
        training=float(forward + backward + recompute),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device at the peak of a training step, by component.

    ``weights`` is the fp32 parameters plus, under autocast, their low-precision copies; ``activations`` is
    what the forward saves for backward plus the working set at the top of backward. ``peak`` adds the
    runtime's own memory (``runtime``) and takes the larger of the backward peak and the optimizer step.
    ``worst_case_peak`` is the peak of the device that receives the most routed rows when routing is as
    unbalanced as the spec allows (only expert parallelism spreads experts over devices; with every expert
    on every device, imbalance changes which experts work, not how many rows: tokens × top_k).
    """

    precision: str
    checkpointing: bool
    weights: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int
    peak: int
    worst_case_peak: int
    capacity: int
    imbalance_factor: float  # routed rows on the busiest device / the balanced figure

    @property
    def used_fraction(self) -> float:
        return self.peak / self.capacity if self.capacity else float("inf")


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds per optimizer step (all micro-batches), throughput and the whole run (evaluations included)."""

    step_seconds: float
    compute_seconds: float  # matmul time per step, before calibration
    memory_seconds: float  # bandwidth-bound and dispatch time per step (optimizer, elementwise), uncalibrated
    worst_case_step_seconds: float  # the busiest device under expert imbalance sets the pace
    tokens_per_step: int
    tokens_per_second: float
    eval_seconds: float  # all evaluations of the run
    total_seconds: float
    calibration_factor: float
    precision_supported: bool
    compile_seconds: float = 0.0  # training.compile: the one-off compilation at the start (in total_seconds)


@dataclass(frozen=True)
class Fix:
    """A change to the spec that lowers the peak memory, with the outcome."""

    changes: dict[str, Any]  # dotted path -> new value
    description: str
    peak: int
    level: str
    step_seconds: float


@dataclass(frozen=True)
class Risk:
    level: RiskLevel
    used_fraction: float
    message: str
    fixes: list[Fix]


@dataclass(frozen=True)
class Estimate:
    """Everything predicted for one spec on one hardware profile (``as_dict()`` is JSON-able)."""

    hardware: str
    num_gpus: int
    parallelism: str
    parameters: dict[str, int]
    flops: dict[str, float]
    memory: MemoryEstimate
    memory_table: list[dict[str, Any]]
    time: TimeEstimate
    risk: Risk
    data: dict[str, float | None]
    # Generation: bytes per token in the KV cache (fp32 and a 2-byte dtype) and for a full max_seq_len sequence.
    kv_cache: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory"]["used_fraction"] = self.memory.used_fraction
        return out


def spec_parallelism(spec: Spec) -> Parallelism:
    """The parallel layout ``spec.training.distributed`` asks for, in the estimator's terms."""
    dist = spec.training.distributed
    if dist.devices > 1 and dist.expert_parallel:
        return "expert"
    return "fsdp" if dist.devices > 1 and dist.strategy == "fsdp" else "ddp"


def _layout(spec: Spec, num_gpus: int | None, parallelism: Parallelism | None) -> tuple[int, Parallelism]:
    """``(devices, parallelism)``: what the caller asks, else what the spec's ``training.distributed`` runs."""
    devices = spec.training.distributed.devices if num_gpus is None else num_gpus
    return devices, spec_parallelism(spec) if parallelism is None else parallelism


def _micro_batch_per_device(spec: Spec, num_devices: int) -> int:
    """Sequences per device per micro-batch: ``training.batch_size`` is the global micro-batch, split evenly
    over the devices (the engine's distributed path; the spec requires devices to divide it)."""
    return math.ceil(spec.training.batch_size / num_devices)


def _devices(num_gpus: int, hardware: HardwareProfile) -> int:
    if num_gpus < 1 or num_gpus > hardware.max_devices:
        raise ValueError(f"num_gpus must be between 1 and {hardware.max_devices} for {hardware.name}")
    return num_gpus


def _device_parameters(spec: Spec, num_devices: int, parallelism: str) -> tuple[int, int]:
    """(parameters held per device, of which take part in autocast matmuls) for the parallel layout.

    Expert parallelism shards the main blocks' routed experts (the MTP modules' stay whole: they are few)."""
    b = parameter_breakdown(spec)
    routed = b["routed_experts"] * _expert_share(spec, num_devices, parallelism)
    per_device = b["total"] - b["routed_experts"] + int(routed)
    head_matmul = b["head"] if spec.model.task == "classification" or b["head"] else b["embedding"]
    matmul = b["attention"] + b["dense_ffn"] + int(routed) + b["shared_experts"] + head_matmul + b["mtp"]
    return per_device, matmul


def _expert_share(spec: Spec, num_devices: int, parallelism: str) -> float:
    """The fraction of the routed experts one device holds."""
    E = spec.model.moe.num_routed_experts
    if parallelism == "expert" and num_devices > 1:
        return math.ceil(E / num_devices) / E
    return 1.0


def optimizer_state_elements(spec: Spec, num_devices: int = 1, parallelism: Parallelism = "ddp") -> int:
    """fp32 numbers of optimizer state one device holds for ``training.optimizer`` (its step counters aside):

    - adamw: 2 per parameter (first and second moments);
    - adafactor: a row and a column of second moments per matrix (the last two dimensions of a stack, per
      expert), a full second moment per vector;
    - sgd: 1 per parameter (the momentum buffer);
    - muon: 1 per parameter of the matrices Muon updates (hidden and expert matrices), 2 for the rest (AdamW).
    """
    name = spec.training.optimizer.name
    share = _expert_share(spec, num_devices, parallelism)
    total = 0.0
    for p in parameter_shapes(spec):
        scale = share if p.component == "routed_experts" else 1.0
        if name == "adamw" or (name == "muon" and p.role not in ("hidden_matrices", "expert_stacks")):
            total += 2 * p.numel * scale
        elif name == "adafactor" and len(p.shape) >= 2:
            total += p.count * math.prod(p.shape[:-2]) * (p.shape[-2] + p.shape[-1]) * scale
        else:
            total += p.numel * scale
    return int(total)


def optimizer_flops_per_step(spec: Spec, num_devices: int = 1, parallelism: Parallelism = "ddp") -> float:
    """Matmul FLOPs one optimizer step adds on one device: Muon's Newton-Schulz iterations (each, for an
    ``m × n`` matrix with ``s = min(m, n)``, ``l = max(m, n)``: the Gram matrix ``2s²l``, its square ``2s³`` and
    the update ``2s²l``); 0 for the others (elementwise, counted as memory traffic)."""
    o = spec.training.optimizer
    if o.name != "muon":
        return 0.0
    share = _expert_share(spec, num_devices, parallelism)
    total = 0.0
    for p in parameter_shapes(spec):
        if p.role not in ("hidden_matrices", "expert_stacks"):
            continue
        short, long = sorted(p.shape[-2:])
        matrices = p.count * math.prod(p.shape[:-2]) * (share if p.component == "routed_experts" else 1.0)
        total += matrices * o.ns_steps * (4 * short * short * long + 2 * short**3)
    return total


def kv_cache_bytes_per_token(spec: Spec, bytes_per_element: int = _FP32) -> int:
    """Bytes a generated or prompt token adds to the KV cache, over all layers: keys and values of every
    key/value head (mha, gqa), or the latent and the shared rotary key (mla's compressed cache)."""
    m = spec.model
    mla = m.mla.kv_lora_rank + m.mla.qk_rope_head_dim
    per_layer = mla if m.attention == "mla" else 2 * m.kv_heads * m.head_dim
    return m.num_layers * per_layer * bytes_per_element


def _imbalance_factor(spec: Spec, num_devices: int, parallelism: str) -> float:
    """Routed rows reaching the busiest device over the balanced count, in the worst routing the spec allows.

    Balanced, a device receives tokens × top_k rows in total whatever the layout. With experts sharded over
    ``g`` devices (E/g each), every token can send up to min(top_k, E/g) rows to one device, from all g
    devices' tokens; a capacity factor c caps each expert at c × (global rows) / E.
    """
    if parallelism != "expert" or num_devices <= 1:
        return 1.0
    moe = spec.model.moe
    E, k, g = moe.num_routed_experts, moe.top_k, num_devices
    local_experts = math.ceil(E / g)
    worst = g * min(k, local_experts) / k  # in units of the balanced rows per device
    if moe.capacity_factor is not None:
        worst = min(worst, local_experts * moe.capacity_factor * g / E)
    return max(1.0, worst)


def estimate_memory(
    spec: Spec,
    hardware: HardwareProfile,
    *,
    precision: str | None = None,
    checkpointing: bool | None = None,
    num_gpus: int | None = None,
    parallelism: Parallelism | None = None,
) -> MemoryEstimate:
    """Peak bytes per device of a training step (see ``MemoryEstimate``); precision and checkpointing
    default to the spec's, devices and parallelism to its ``training.distributed``.

    With fsdp, parameters, gradients and optimizer state are sharded (1/devices each) and one block's full
    parameters and gradients are gathered at a time (FSDP2 reshards after forward): the largest block is added
    whole to the weights and gradients."""
    t = spec.training
    p = precision or t.precision
    ckpt = t.gradient_checkpointing if checkpointing is None else checkpointing
    g, parallelism = _layout(spec, num_gpus, parallelism)
    g = _devices(g, hardware)
    params, matmul_params = _device_parameters(spec, g, parallelism)
    low = _act_bytes(p)
    m = spec.model
    b = parameter_breakdown(spec)
    layers = max(1, m.num_layers)

    gradients = params * _FP32
    optimizer = optimizer_state_elements(spec, g, parallelism) * _FP32
    gathered = 0  # fsdp: one block's unsharded parameters (and as much gradient) live at a time
    if parallelism == "fsdp" and g > 1:
        gathered = (b["total"] - b["embedding"] - b["head"]) // layers * _FP32
        gradients = math.ceil(gradients / g) + gathered
        optimizer = math.ceil(optimizer / g)
    a = activation_bytes_per_token(spec, p)
    N = _micro_batch_per_device(spec, g) * spec.data.seq_len
    overhead = hardware.activation_overhead
    # Autocast's low-precision copies of the matmul weights: cached through the forward and saved for
    # backward. With checkpointing they are not saved: backward re-casts one block at a time (and the head).
    copies = matmul_params * low if low != _FP32 else 0
    head_matmul = b["head"] or b["embedding"]  # the output projection (the embedding when tied)
    block_copies = (matmul_params - head_matmul - b["mtp"]) // layers * low if copies else 0
    head_copies = head_matmul * low if copies else 0

    # The fused head's two fp32 chunk buffers (its logits, then their gradient; their log-probabilities), alive
    # while the head runs at the end of the forward, when every saved activation is too (``kernels.head_loss``;
    # one head at a time with MTP). Not saved for backward, so not in ``activation_bytes_per_token``: missing, a
    # 2-layer model on 8k tokens of a 2,048 vocabulary was predicted 580 MiB and measured 650-688.
    head_buffers = 0
    if m.task == "causal_lm":
        head_rows = min(max(1, _HEAD_CHUNK_ELEMENTS // m.vocab_size), N)
        head_buffers = 2 * head_rows * m.vocab_size * _FP32

    def phases(imbalance: float) -> tuple[int, int]:
        """(activations at the peak of backward, the larger forward-end total with checkpointing or 0)."""
        moe_block = a.moe + a.expert_rows * (imbalance - 1.0)
        dense_layers = m.num_layers - m.num_moe_layers
        mtp_outside = m.mtp_depth * a.mtp_outside_block
        if not ckpt:
            saved = m.num_layers * a.attention + m.num_moe_layers * moe_block + dense_layers * a.dense + a.head
            saved += mtp_outside + m.mtp_depth * a.mtp_block
            return int(N * saved * overhead) + head_buffers, 0
        block = a.attention + (moe_block if m.num_moe_layers else a.dense)
        kept = (m.num_layers + m.mtp_depth) * a.checkpoint_input + a.head + mtp_outside
        backward = int(N * (kept + block) * overhead)
        # At the end of the forward every block's weight copy is still cached, but no block is recomputed yet.
        forward_end = (math.ceil(params / g) if gathered else params) * _FP32 + copies + int(N * kept * overhead)
        return backward, forward_end + head_buffers

    live_copies = copies if not ckpt else block_copies + head_copies
    if gathered:
        # Autocast copies are made from the gathered block only; the sharded fp32 parameters stay resident.
        live_copies = block_copies + head_copies if copies else 0
        weights = math.ceil(params * _FP32 / g) + gathered + live_copies
    else:
        weights = params * _FP32 + live_copies

    def peak(act: int, forward_end: int) -> int:
        # Gradients are counted with the activations even when a step has one micro-batch (they are None
        # during its forward): the allocator does not hand back what backward freed in time for them, and
        # a real CPU run's peak matches W + O + G + A, not the max of its phases.
        return hardware.reserved_bytes + optimizer + gradients + max(weights + act, forward_end)

    imbalance = _imbalance_factor(spec, g, parallelism)
    act, forward_end = phases(1.0)
    worst_act, worst_forward_end = phases(imbalance)
    total = peak(act, forward_end)
    # Shown components add up to the peak: a forward-end peak shows as activations.
    shown_act = total - hardware.reserved_bytes - optimizer - gradients - weights
    return MemoryEstimate(
        precision=p,
        checkpointing=ckpt,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=shown_act,
        runtime=hardware.reserved_bytes,
        peak=total,
        worst_case_peak=peak(worst_act, worst_forward_end),
        capacity=hardware.memory_bytes,
        imbalance_factor=imbalance,
    )


def _risk_level(peak: int, capacity: int) -> RiskLevel:
    if peak <= FITS_BELOW * capacity:
        return "fits"
    return "tight" if peak <= capacity else "will_not_fit"


# Dispatch: what eager PyTorch costs per operation whatever its size (Python, the dispatcher, autograd's graph),
# which dominates a small model's step on a CPU. Operation counts are aten calls counted with a
# TorchDispatchMode on built models (torch 2.13, CPU, fp32; forward, backward, clipping and the optimizer step
# apart) and expressed per part of the spec; ``HardwareProfile.layer_overhead_seconds`` is the time of one
# reference MoE layer's forward and backward (``_REFERENCE_LAYER_OPS`` calls), so one call costs
# ``layer_overhead_seconds / _REFERENCE_LAYER_OPS``.
_REFERENCE_LAYER_OPS = 234  # a tiny-demo MoE block (MHA, RMSNorm, SwiGLU, 1 shared expert): 92 forward + 142 backward
_SHARED_EXPERT_OPS = 33  # its shared expert's part (9 + 24): a block without shared experts issues 201
_DENSE_LAYER_OPS = 167  # a dense block (60 + 107): no router, no expert dispatch
_MLA_EXTRA_OPS = 89  # multi-head latent attention over MHA (34 + 55): latent projections, norms, rotary split
_PLAIN_ACTIVATION_OPS = -22  # GELU/ReLU over SwiGLU (-6 - 16), per block
_LAYERNORM_OPS = -20  # per norm: LayerNorm is one kernel (1 + 5 calls), kernels.rms_norm 7 forward + 19 backward
_SIGMOID_ROUTER_OPS = 10  # sigmoid scores with their normalisation, per MoE block
_DROPOUT_OPS = 12  # per block with dropout (its masks forward, their products backward)
# Embedding, final norm, output head and loss with one chunk, forward and backward (100 calls): a training step's
# fused head + loss (workers.engine.kernels.head_loss) adds 28 calls per further chunk of its rows.
_HEAD_OPS = 100
_HEAD_CHUNK_OPS = 28
_HEAD_CHUNK_ELEMENTS = 1 << 22  # as workers.engine.kernels.head_loss chunks the logits
_MTP_EXTRA_OPS = 159  # an MTP module beyond its block: two norms, the projection, the head again (one chunk)
# Per parameter tensor and step: gradient clipping's norm and scale, fused AdamW (or SGD's foreach) and zeroing
# walk the tensors one by one: 64 µs per tensor measured (thread time, 1 thread), 9 calls' worth; Adafactor's
# foreach factored update 13 calls more per tensor.
_PARAMETER_TENSOR_OPS = {"adamw": 9, "sgd": 9, "adafactor": 22, "muon": 9}
# Muon (torch.optim.Muon per matrix, StackedMuon per stack): momentum, Nesterov, the normalisation, the update
# and 3 calls per Newton-Schulz iteration, per matrix: 360 more calls than AdamW for the tiny demo's 12 matrices.
_MUON_MATRIX_OPS = 15
# Per step: clipping's and the optimizer's fixed work, the router bias update and the training loop's bookkeeping
# (its loss sums, .item() reads, the anomaly guard): ~0.55 ms measured on the reference machine, 80 calls' worth.
_STEP_OPS = 80


@dataclass(frozen=True)
class DispatchCount:
    """Operations eager PyTorch issues: per micro-batch (forward and backward) and per optimizer step."""

    micro_batch: float
    step: float


def dispatch_operations(spec: Spec, tokens: int | None = None) -> DispatchCount:
    """The calls one micro-batch of ``tokens`` tokens (default: the spec's micro-batch) and one optimizer step
    issue, in units of one aten call (see ``_REFERENCE_LAYER_OPS``): blocks by kind, the head's loss chunks, the
    MTP modules, and the optimizer's walk over parameter tensors (plus Muon's per-matrix iterations)."""
    m, moe, o = spec.model, spec.model.moe, spec.training.optimizer
    N = tokens if tokens is not None else spec.training.batch_size * spec.data.seq_len

    def block(use_moe: bool) -> float:
        ops: float = _DENSE_LAYER_OPS
        if use_moe:
            ops = _REFERENCE_LAYER_OPS - (0 if moe.num_shared_experts else _SHARED_EXPERT_OPS)
            ops += _SIGMOID_ROUTER_OPS if moe.scoring == "sigmoid" else 0
        ops += _MLA_EXTRA_OPS if m.attention == "mla" else 0
        ops += _PLAIN_ACTIVATION_OPS if m.activation != "swiglu" else 0
        ops += 2 * _LAYERNORM_OPS if m.norm == "layernorm" else 0
        return ops + (_DROPOUT_OPS if m.dropout > 0 else 0)

    dense = m.num_layers - m.num_moe_layers
    head: float = _HEAD_OPS + (_LAYERNORM_OPS if m.norm == "layernorm" else 0)
    if m.task == "causal_lm":
        V = m.vocab_size
        head += _HEAD_CHUNK_OPS * (math.ceil(N / max(1, _HEAD_CHUNK_ELEMENTS // V)) - 1)
    micro = m.num_moe_layers * block(True) + dense * block(False) + head
    micro += m.mtp_depth * (block(m.num_moe_layers > 0) + _MTP_EXTRA_OPS + head - _HEAD_OPS)
    shapes = parameter_shapes(spec)
    step: float = _STEP_OPS + _PARAMETER_TENSOR_OPS[o.name] * sum(p.count for p in shapes)
    if o.name == "muon":
        matrices = sum(p.count for p in shapes if p.role in ("hidden_matrices", "expert_stacks"))
        step += matrices * (_MUON_MATRIX_OPS + 3 * o.ns_steps)
    return DispatchCount(micro_batch=float(micro), step=float(step))


def matmul_efficiency(spec: Spec, hardware: HardwareProfile) -> float:
    """The fraction of the matmul peak a step of ``spec`` reaches: the profile's ``efficiency``, scaled down by
    ``sqrt(hidden_size / full_speed_width)`` for a model narrower than the profile's ``full_speed_width``."""
    width = hardware.full_speed_width
    if not width or spec.model.hidden_size >= width:
        return hardware.efficiency
    return hardware.efficiency * math.sqrt(spec.model.hidden_size / width)


def dropout_elements_per_token(spec: Spec) -> float:
    """Dropout-mask elements drawn per token of a training micro-batch: ``hidden_size`` for the embedding's
    dropout and for each block's two residual ones (an MTP module: its embedding and its block), and attention
    dropout's row of ``num_heads x seq_len`` probabilities per block (the math path draws the whole square)."""
    m = spec.model
    blocks = m.num_layers + m.mtp_depth
    elements = 0.0
    if m.dropout > 0:
        elements += m.hidden_size * (1 + 2 * blocks + m.mtp_depth)
    if m.attention_dropout > 0:
        elements += m.num_heads * spec.data.seq_len * blocks
    return elements


def estimate_time(
    spec: Spec,
    hardware: HardwareProfile,
    *,
    num_gpus: int | None = None,
    parallelism: Parallelism | None = None,
    calibration: float = 1.0,
) -> TimeEstimate:
    """Step time as matmul FLOPs at the profile's efficiency plus bandwidth-bound traffic, dispatch and the
    drawing of dropout masks, times the calibration factor (measured / predicted step time from a real run on
    this hardware; 1.0 uncalibrated).

    Devices (default: the spec's ``training.distributed``) work in parallel on their share of the global
    micro-batch; on a CPU profile the processes share the cores and the memory bandwidth. Communication is not
    modelled (``make bench`` measures it). An unsupported precision is timed at fp32 speed and reported as such.
    """
    t = spec.training
    g, parallelism = _layout(spec, num_gpus, parallelism)
    g = _devices(g, hardware)
    supported = hardware.supports(t.precision)
    peak_flops = hardware.peak_flops.get(t.precision) if supported else hardware.peak_flops["fp32"]
    assert peak_flops is not None  # every profile has fp32
    rate = peak_flops * matmul_efficiency(spec, hardware)
    share = g if hardware.kind == "cpu" else 1  # CPU "devices" are processes on the same cores
    rate /= share
    fl = flops_per_token(spec)
    act = activation_bytes_per_token(spec)
    m = spec.model
    N = _micro_batch_per_device(spec, g) * spec.data.seq_len  # tokens per device per micro-batch
    params, _ = _device_parameters(spec, g, parallelism)

    b = parameter_breakdown(spec)
    one_expert = b["routed_experts"] // max(1, m.num_moe_layers * m.moe.num_routed_experts)
    saved = m.num_layers * act.attention + m.num_moe_layers * act.moe
    saved += (m.num_layers - m.num_moe_layers) * act.dense + act.head  # bytes per token
    saved += m.mtp_depth * (act.mtp_outside_block + act.mtp_block)
    bandwidth = hardware.bandwidth_bytes_per_s / share
    # Muon orthogonalises in bf16 (where the device has it) once per step, whatever the batch.
    ns_rate = (hardware.peak_flops.get("bf16") or hardware.peak_flops["fp32"] or rate) * hardware.efficiency / share
    optimizer_seconds = optimizer_flops_per_step(spec, g, parallelism) / ns_rate
    optimizer_traffic = _OPTIMIZER_TRAFFIC_BYTES[t.optimizer.name] * params
    # Dispatch is one thread's work per process, whatever the cores: not divided by ``share``. On a CPU that
    # thread also computes, so every call adds its time; a GPU's launches are asynchronous and hide behind its
    # kernels but for a floor per block (``layer_overhead_seconds`` each, not measured here).
    op_seconds = hardware.layer_overhead_seconds / _REFERENCE_LAYER_OPS
    if hardware.kind == "cpu":
        ops = dispatch_operations(spec, N)
    else:
        ops = DispatchCount(micro_batch=float(_REFERENCE_LAYER_OPS * (m.num_layers + m.mtp_depth)), step=0.0)

    # Drawing dropout masks: one thread's work per process on a CPU, like dispatch (not divided by ``share``).
    dropout = hardware.dropout_seconds_per_element * dropout_elements_per_token(spec) * N * t.grad_accum_steps

    def step(imbalance: float) -> tuple[float, float]:
        # On the busiest device the routed experts' share of the work grows with the imbalance.
        expert_flops = 6 * m.num_moe_layers * m.moe.top_k * one_expert  # forward + backward, per token
        flops = (fl.training + expert_flops * (imbalance - 1.0)) * N * t.grad_accum_steps
        traffic = _ACTIVATION_TRAFFIC_FACTOR * saved * N * t.grad_accum_steps + optimizer_traffic
        dispatch = op_seconds * (ops.micro_batch * t.grad_accum_steps + ops.step)
        return flops / rate + optimizer_seconds, traffic / bandwidth + dispatch + dropout

    compute, memory = step(1.0)
    worst_compute, worst_memory = step(_imbalance_factor(spec, g, parallelism))
    step_seconds = (compute + memory) * calibration
    tokens_per_step = spec.tokens_per_step  # batch_size is the global micro-batch
    # An evaluation micro-batch is a forward only: a third of the FLOPs, activations written once, ~40% of the
    # calls (a block issues 92 of its 234 in the forward).
    eval_batch_seconds = (
        fl.forward * N / rate + saved * N / bandwidth + op_seconds * ops.micro_batch * 0.4
    ) * calibration
    eval_seconds = (t.max_steps // t.eval_interval) * t.eval_batches * eval_batch_seconds
    return TimeEstimate(
        step_seconds=step_seconds,
        compute_seconds=compute,
        memory_seconds=memory,
        worst_case_step_seconds=(worst_compute + worst_memory) * calibration,
        tokens_per_step=tokens_per_step,
        tokens_per_second=tokens_per_step / step_seconds,
        eval_seconds=eval_seconds,
        total_seconds=t.max_steps * step_seconds + eval_seconds + estimate_compile_seconds(spec),
        calibration_factor=calibration,
        precision_supported=supported,
        compile_seconds=estimate_compile_seconds(spec),
    )


# training.compile: TorchInductor compiles each block's training forward and backward once per start, on the
# host's CPU whatever the accelerator; one compiled graph serves every block of a kind (dense or MoE: the MTP
# modules' blocks are MoE blocks), so the time grows with the kinds, not the depth. bench.compile on this 2-core
# CPU (cold cache, load average 6-8): 21-42 s for the CPU templates (one kind each); quiet (load under 2):
# 8-16 s. The estimate takes a busy worker's figure.
_COMPILE_SECONDS_PER_BLOCK_KIND = 30.0


def estimate_compile_seconds(spec: Spec) -> float:
    """Seconds the one-off ``torch.compile`` of the model takes at the start of a run; 0 with compile off."""
    if not spec.training.compile:
        return 0.0
    m = spec.model
    kinds = int(m.num_moe_layers > 0) + int(m.num_layers > m.num_moe_layers)
    return _COMPILE_SECONDS_PER_BLOCK_KIND * kinds


def _with_changes(spec: Spec, changes: dict[str, Any]) -> Spec:
    """A copy of ``spec`` with dotted-path changes applied (validated again)."""
    raw = spec.model_dump(mode="json")
    for path, value in changes.items():
        node = raw
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return Spec.model_validate(raw)


def _low_precision_for(hardware: HardwareProfile) -> str | None:
    for p in ("bf16", "fp16"):
        if hardware.supports(p):
            return p
    return None


def suggest_memory_fixes(
    spec: Spec,
    hardware: HardwareProfile,
    *,
    num_gpus: int | None = None,
    parallelism: Parallelism | None = None,
    calibration: float = 1.0,
) -> list[Fix]:
    """Changes that bring the peak under the "fits" line, cheapest in speed first, applied cumulatively:
    gradient checkpointing (~⅓ more compute), then a low precision the hardware supports, then halving the
    micro-batch while doubling accumulation (same tokens per step). Stops at the first that fits; an empty
    list when the spec already fits. The last entry does not fit when nothing here is enough."""
    t = spec.training
    fixes: list[Fix] = []
    changes: dict[str, Any] = {}
    candidate = spec

    current = estimate_memory(spec, hardware, num_gpus=num_gpus, parallelism=parallelism)
    best_peak = current.peak

    def attempt(new: dict[str, Any], description: str) -> bool:
        """Add ``new`` to the changes if it lowers the peak (a low precision can raise it once checkpointing
        has shrunk the activations: its weight copies then outweigh what it saves); True once it fits."""
        nonlocal candidate, best_peak
        try:
            trial = _with_changes(spec, {**changes, **new})
        except ValidationError:  # e.g. a micro-batch the devices no longer divide, fp16 with fsdp
            return False
        mem = estimate_memory(trial, hardware, num_gpus=num_gpus, parallelism=parallelism)
        if mem.peak >= best_peak:
            return False
        changes.update(new)
        candidate, best_peak = trial, mem.peak
        step = estimate_time(trial, hardware, num_gpus=num_gpus, parallelism=parallelism, calibration=calibration)
        level = _risk_level(mem.peak, mem.capacity)
        fixes.append(Fix(dict(changes), description, mem.peak, level, step.step_seconds))
        return level == "fits"

    if _risk_level(current.peak, current.capacity) == "fits":
        return []
    if not t.gradient_checkpointing and attempt(
        {"training.gradient_checkpointing": True},
        "Enable gradient checkpointing: keep only block inputs and recompute the rest in backward.",
    ):
        return fixes
    low = _low_precision_for(hardware)
    if (
        t.precision == "fp32"
        and low is not None
        and attempt(
            {"training.precision": low}, f"Train in {low}: half-size activations (fp32 master weights are kept)."
        )
    ):
        return fixes
    batch, accum = candidate.training.batch_size, candidate.training.grad_accum_steps
    while batch > 1 and accum * 2 <= 4096:
        batch, accum = (batch + 1) // 2, accum * 2
        if attempt(
            {"training.batch_size": batch, "training.grad_accum_steps": accum},
            f"Micro-batch {batch} × {accum} accumulation steps: about the same tokens per step, half the activations.",
        ):
            return fixes
    return fixes


def estimate(
    spec: Spec,
    hardware: HardwareProfile,
    *,
    num_gpus: int | None = None,
    parallelism: Parallelism | None = None,
    calibration: float = 1.0,
    dataset_tokens: int | None = None,
) -> Estimate:
    """Parameters, FLOPs, memory (with the per-precision table), time, out-of-memory risk with its fixes,
    and the data budget of ``spec`` on ``num_gpus`` devices of ``hardware``.

    ``calibration`` multiplies predicted times (measured / predicted step time from a run on a worker of
    this hardware). ``dataset_tokens`` (tokens in the training data) adds epochs and tokens per parameter.
    """
    b = parameter_breakdown(spec)
    g, parallelism = _layout(spec, num_gpus, parallelism)
    g = _devices(g, hardware)
    fl = flops_per_token(spec)
    memory = estimate_memory(spec, hardware, num_gpus=g, parallelism=parallelism)
    time = estimate_time(spec, hardware, num_gpus=g, parallelism=parallelism, calibration=calibration)
    table = []
    for p in PRECISIONS:
        for ckpt in (False, True):
            mem = estimate_memory(spec, hardware, precision=p, checkpointing=ckpt, num_gpus=g, parallelism=parallelism)
            table.append(
                {
                    "precision": p,
                    "checkpointing": ckpt,
                    "supported": hardware.supports(p),
                    "peak": mem.peak,
                    "activations": mem.activations,
                    "level": _risk_level(mem.peak, mem.capacity),
                }
            )
    level = _risk_level(memory.peak, memory.capacity)
    fixes = suggest_memory_fixes(spec, hardware, num_gpus=g, parallelism=parallelism, calibration=calibration)
    gib = 2**30
    if level == "fits":
        message = f"Fits: {memory.peak / gib:.1f} GiB of {memory.capacity / gib:.1f} GiB per device."
    elif level == "tight":
        message = (
            f"Tight: {memory.peak / gib:.1f} GiB of {memory.capacity / gib:.1f} GiB per device leaves little room "
            "for fragmentation and evaluation."
        )
    else:
        message = f"Will not fit: {memory.peak / gib:.1f} GiB needed, {memory.capacity / gib:.1f} GiB per device."
    if level != "fits" and fixes:
        last = fixes[-1]
        message += (
            f" Fix: {'; '.join(f'{k} = {v}' for k, v in last.changes.items())} → {last.peak / gib:.1f} GiB."
            if last.level == "fits"
            else " Even with checkpointing, low precision and micro-batch 1 it does not fit: use a smaller model, "
            "shorter sequences or more devices with expert parallelism."
        )
    trained = spec.tokens_per_step * spec.training.max_steps
    data: dict[str, float | None] = {
        "tokens_trained": float(trained),
        "dataset_tokens": float(dataset_tokens) if dataset_tokens else None,
        "epochs": trained / dataset_tokens if dataset_tokens else None,
        "dataset_tokens_per_parameter": dataset_tokens / b["total"] if dataset_tokens else None,
        "trained_tokens_per_active_parameter": trained / b["active"],
    }
    return Estimate(
        hardware=hardware.key,
        num_gpus=g,
        parallelism=parallelism,
        parameters={
            "total": b["total"],
            "active": b["active"],
            "per_device": _device_parameters(spec, g, parallelism)[0],
            **{k: v for k, v in b.items() if k not in ("total", "active")},
        },
        flops={
            "forward_per_token": fl.forward,
            "backward_per_token": fl.backward,
            "recompute_per_token": fl.recompute,
            "attention_forward_per_token": fl.attention_forward,
            "training_per_token": fl.training,
            "per_step": fl.training * time.tokens_per_step,
            "total": fl.training * time.tokens_per_step * spec.training.max_steps,
        },
        memory=memory,
        memory_table=table,
        time=time,
        risk=Risk(level=level, used_fraction=memory.used_fraction, message=message, fixes=fixes),
        data=data,
        kv_cache={
            "bytes_per_token": kv_cache_bytes_per_token(spec),
            "bytes_per_token_16bit": kv_cache_bytes_per_token(spec, 2),
            "bytes_per_sequence": kv_cache_bytes_per_token(spec) * spec.model.max_seq_len,
        },
    )
