"""Parameter counts predicted from a spec without building the model.

Imported by the web tier, so it must not import torch. The arithmetic mirrors ``workers.engine.model``
exactly (a test compares it with ``numel`` of built models); change both together.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from workers.engine.hardware import PRECISIONS, HardwareProfile
from workers.engine.spec import ModelSpec, Spec


def _ffn_params(d_model: int, hidden: int, activation: str) -> int:
    """A feed-forward without biases; SwiGLU's input projection is twice as wide (gate and up)."""
    in_width = 2 * hidden if activation == "swiglu" else hidden
    return d_model * in_width + hidden * d_model


def _norm_params(m: ModelSpec) -> int:
    return m.hidden_size if m.norm == "rmsnorm" else 2 * m.hidden_size  # LayerNorm has a bias


def parameter_breakdown(spec: Spec) -> dict[str, int]:
    """Parameters by component, plus the totals that matter for cost.

    Keys: ``embedding``, ``attention``, ``dense_ffn``, ``routed_experts``, ``shared_experts``, ``router``,
    ``norms``, ``head`` (components, summed over layers; ``head`` is 0 when tied to the embedding) and:

    - ``total``: every distinct parameter (a tied matrix once) = ``sum(p.numel() for p in parameters())``;
    - ``active``: parameters one token uses: everything except the routed experts it is not sent to
      (``num_routed_experts - top_k`` per MoE layer); embeddings counted once, as in ``total``;
    - ``active_matmul``: the active parameters that take part in a matrix multiply per token, the basis of
      FLOP estimates: ``active`` minus the input embedding (a lookup) and the norms (elementwise), plus the
      output projection when it is tied (the shared matrix is then used twice: looked up and multiplied).
    """
    m = spec.model
    moe = m.moe
    C, H, KV, D = m.hidden_size, m.num_heads, m.kv_heads, m.head_dim
    dense_layers = min(moe.first_dense_layers, m.num_layers)
    moe_layers = m.num_moe_layers

    embedding = m.vocab_size * C
    attention = m.num_layers * (C * (H + 2 * KV) * D + H * D * C)
    dense_ffn = dense_layers * _ffn_params(C, moe.resolved_dense_hidden_size, m.activation)
    one_expert = _ffn_params(C, moe.expert_hidden_size, m.activation)
    routed_experts = moe_layers * moe.num_routed_experts * one_expert
    shared_experts = 0
    if moe.num_shared_experts > 0:
        shared_experts = moe_layers * _ffn_params(C, moe.num_shared_experts * moe.expert_hidden_size, m.activation)
    router = moe_layers * moe.num_routed_experts * C
    norms = (2 * m.num_layers + 1) * _norm_params(m)
    if m.task == "classification":
        assert m.num_labels is not None  # guaranteed by the spec's cross-field rules
        head = C * m.num_labels + m.num_labels
        head_matmul = C * m.num_labels
    else:
        head = 0 if m.tie_embeddings else m.vocab_size * C
        head_matmul = m.vocab_size * C

    total = embedding + attention + dense_ffn + routed_experts + shared_experts + router + norms + head
    inactive = moe_layers * (moe.num_routed_experts - moe.top_k) * one_expert
    active = total - inactive
    active_matmul = attention + dense_ffn + (routed_experts - inactive) + shared_experts + router + head_matmul
    return {
        "embedding": embedding,
        "attention": attention,
        "dense_ffn": dense_ffn,
        "routed_experts": routed_experts,
        "shared_experts": shared_experts,
        "router": router,
        "norms": norms,
        "head": head,
        "total": total,
        "active": active,
        "active_matmul": active_matmul,
    }


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
# and AdamW state in fp32; autocast for bf16/fp16, whose low-precision weight copies are cached through the
# forward and saved for backward (with checkpointing, re-made one block at a time). The peak is weights +
# gradients + optimizer state + activations (+ the allocator's overhead on them) + the runtime: a real CPU run's
# peak resident set matches that sum within a few percent (tests/engine/test_estimate_costs.py), because
# the allocator does not hand memory freed by backward back in time for the gradients.

_FP32 = 4
_INT64 = 8
_ADAMW_STATE_BYTES = 2 * _FP32  # exp_avg and exp_avg_sq per parameter
# Memory traffic of one optimizer step per parameter: AdamW reads p, g, m, v and writes p, m, v (28 B), plus
# gradient clipping (a norm read and a scale) and zeroing: ~48 B, all fp32.
_OPTIMIZER_TRAFFIC_BYTES = 48
# Elementwise work (norms, activations, rotary, routing gathers) is bandwidth-bound, not FLOP-bound: each
# saved activation byte costs about two bytes of traffic over the step (fitted on the reference CPU).
_ACTIVATION_TRAFFIC_FACTOR = 2
FITS_BELOW = 0.85  # fraction of a device's memory under which a run "fits"; up to 1.0 it is "tight"

Parallelism = Literal["ddp", "expert"]
RiskLevel = Literal["fits", "tight", "will_not_fit"]


def _act_bytes(precision: str) -> int:
    """Bytes of an element that autocast computes in the low precision (matmul outputs and their users)."""
    return 2 if precision in ("bf16", "fp16") else _FP32


def _norm_saved(m: ModelSpec) -> int:
    """fp32 elements per token a normalisation saves, its output included (read by the next matmul).

    RMSNorm (decomposed on CPU): input, normalised input, rstd and the weighted output; LayerNorm: input,
    mean and rstd and the output.
    """
    C = m.hidden_size
    return 3 * C + 1 if m.norm == "rmsnorm" else 2 * C + 2


def _ffn_saved(activation: str, hidden: int) -> int:
    """Elements per row a feed-forward saves after its input projection: the projection's output (that the
    activation's backward reads) and the activation's output (the input of the output projection)."""
    in_width = 2 * hidden if activation == "swiglu" else hidden
    return in_width + hidden


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes saved for backward per token: one attention sub-block, one MoE or dense feed-forward sub-block,
    and the head and loss (``head``).
    ``checkpoint_input`` is what gradient checkpointing keeps per token per layer (the block input)."""

    attention: float
    moe: float
    dense: float
    head: float
    checkpoint_input: float
    expert_rows: float  # of ``moe``: the part proportional to routed rows (top_k of them per token)


def activation_bytes_per_token(spec: Spec, precision: str | None = None) -> ActivationBytes:
    """Saved activations per token by component, for ``precision`` (default: the spec's)."""
    m, moe, t = spec.model, spec.model.moe, spec.training
    p = precision or t.precision
    low = _act_bytes(p)
    cast_copy = low if low != _FP32 else 0  # autocast saves a low-precision copy of a fp32 matmul input
    C, H, KV, D = m.hidden_size, m.num_heads, m.kv_heads, m.head_dim
    T = spec.data.seq_len
    mask = 1 if m.dropout > 0 else 0  # a dropout keeps a one-byte mask per element

    attention: float = (
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

    head: float = _norm_saved(m) * _FP32 + cast_copy * C + 2 * _INT64 + mask * C  # + ids and targets
    if m.task == "causal_lm":
        V = m.vocab_size
        # The logits. The fused head + loss (workers.engine.kernels.linear_cross_entropy) upcasts them for the
        # loss and computes their gradient a chunk of ~8 MB at a time: no (N, V) fp32 copy or gradient.
        head += V * low
    return ActivationBytes(
        attention=float(attention),
        moe=float(moe_bytes),
        dense=float(dense),
        head=float(head),
        checkpoint_input=float(C * _FP32),
        expert_rows=float(rows),
    )


@dataclass(frozen=True)
class FlopsPerToken:
    """Floating-point operations per trained token (a multiply-add is 2). ``attention_forward`` is the part
    of ``forward`` spent on scores and weighted values (causal: each query sees (T+1)/2 keys on average)."""

    forward: float
    backward: float
    recompute: float  # the blocks' forward again with gradient checkpointing, but for each block's last matmul
    attention_forward: float
    training: float  # forward + backward + recompute


def flops_per_token(spec: Spec, checkpointing: bool | None = None) -> FlopsPerToken:
    """FLOPs per token of a training step (backward = 2 × forward: gradients of inputs and of weights)."""
    m = spec.model
    b = parameter_breakdown(spec)
    T = spec.data.seq_len
    ckpt = spec.training.gradient_checkpointing if checkpointing is None else checkpointing
    active_routed = b["routed_experts"] - m.num_moe_layers * (m.moe.num_routed_experts - m.moe.top_k) * (
        b["routed_experts"] // max(1, m.num_moe_layers * m.moe.num_routed_experts)
    )
    blocks_matmul = b["attention"] + b["dense_ffn"] + active_routed + b["shared_experts"] + b["router"]
    attention = 2 * 2 * m.num_layers * m.num_heads * m.head_dim * (T + 1) / 2  # QK^T and AV
    if m.task == "causal_lm":
        head: float = 2 * m.vocab_size * m.hidden_size
    else:
        assert m.num_labels is not None
        head = 2 * m.hidden_size * m.num_labels / T  # one pooled token per sequence
    blocks_forward = 2 * blocks_matmul + attention
    forward = blocks_forward + head
    backward = 2 * forward
    recompute = 0.0
    if ckpt:
        # PyTorch's non-reentrant checkpoint stops recomputing once backward has every tensor it needs: the
        # block's last matmul (the dense or shared experts' output projection, whose output nothing saves)
        # is not run again.
        moe = m.moe
        trailing = (m.num_layers - m.num_moe_layers) * moe.resolved_dense_hidden_size * m.hidden_size
        trailing += m.num_moe_layers * moe.num_shared_experts * moe.expert_hidden_size * m.hidden_size
        recompute = blocks_forward - 2 * trailing
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

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory"]["used_fraction"] = self.memory.used_fraction
        return out


def _devices(num_gpus: int, hardware: HardwareProfile) -> int:
    if num_gpus < 1 or num_gpus > hardware.max_devices:
        raise ValueError(f"num_gpus must be between 1 and {hardware.max_devices} for {hardware.name}")
    return num_gpus


def _device_parameters(spec: Spec, num_devices: int, parallelism: str) -> tuple[int, int]:
    """(parameters held per device, of which take part in autocast matmuls) for the parallel layout."""
    b = parameter_breakdown(spec)
    E = spec.model.moe.num_routed_experts
    routed = b["routed_experts"]
    if parallelism == "expert" and num_devices > 1:
        routed = routed * math.ceil(E / num_devices) // E
    per_device = b["total"] - b["routed_experts"] + routed
    head_matmul = b["head"] if spec.model.task == "classification" or b["head"] else b["embedding"]
    matmul = b["attention"] + b["dense_ffn"] + routed + b["shared_experts"] + head_matmul
    return per_device, matmul


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
    num_gpus: int = 1,
    parallelism: Parallelism = "ddp",
) -> MemoryEstimate:
    """Peak bytes per device of a training step (see ``MemoryEstimate``); precision and checkpointing
    default to the spec's."""
    t = spec.training
    p = precision or t.precision
    ckpt = t.gradient_checkpointing if checkpointing is None else checkpointing
    g = _devices(num_gpus, hardware)
    params, matmul_params = _device_parameters(spec, g, parallelism)
    low = _act_bytes(p)

    gradients = params * _FP32
    optimizer = params * _ADAMW_STATE_BYTES
    m = spec.model
    a = activation_bytes_per_token(spec, p)
    N = t.batch_size * spec.data.seq_len
    overhead = hardware.activation_overhead
    # Autocast's low-precision copies of the matmul weights: cached through the forward and saved for
    # backward. With checkpointing they are not saved: backward re-casts one block at a time (and the head).
    copies = matmul_params * low if low != _FP32 else 0
    b = parameter_breakdown(spec)
    layers = max(1, m.num_layers)
    head_matmul = b["head"] or b["embedding"]  # the output projection (the embedding when tied)
    block_copies = (matmul_params - head_matmul) // layers * low if copies else 0
    head_copies = head_matmul * low if copies else 0

    def phases(imbalance: float) -> tuple[int, int]:
        """(activations at the peak of backward, the larger forward-end total with checkpointing or 0)."""
        moe_block = a.moe + a.expert_rows * (imbalance - 1.0)
        dense_layers = m.num_layers - m.num_moe_layers
        if not ckpt:
            saved = m.num_layers * a.attention + m.num_moe_layers * moe_block + dense_layers * a.dense + a.head
            return int(N * saved * overhead), 0
        block = a.attention + (moe_block if m.num_moe_layers else a.dense)
        kept = m.num_layers * a.checkpoint_input + a.head
        backward = int(N * (kept + block) * overhead)
        # At the end of the forward every block's weight copy is still cached, but no block is recomputed yet.
        forward_end = params * _FP32 + copies + int(N * kept * overhead)
        return backward, forward_end

    live_copies = copies if not ckpt else block_copies + head_copies
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


def estimate_time(
    spec: Spec,
    hardware: HardwareProfile,
    *,
    num_gpus: int = 1,
    parallelism: Parallelism = "ddp",
    calibration: float = 1.0,
) -> TimeEstimate:
    """Step time as matmul FLOPs at the profile's efficiency plus bandwidth-bound traffic, times the
    calibration factor (measured / predicted step time from a real run on this hardware; 1.0 uncalibrated).

    Devices work in parallel on their own micro-batches (data parallel); communication is not modelled.
    An unsupported precision is timed at fp32 speed and reported as such.
    """
    t = spec.training
    g = _devices(num_gpus, hardware)
    supported = hardware.supports(t.precision)
    peak_flops = hardware.peak_flops.get(t.precision) if supported else hardware.peak_flops["fp32"]
    assert peak_flops is not None  # every profile has fp32
    rate = peak_flops * hardware.efficiency
    fl = flops_per_token(spec)
    act = activation_bytes_per_token(spec)
    m = spec.model
    N = t.batch_size * spec.data.seq_len  # tokens per device per micro-batch
    params, _ = _device_parameters(spec, g, parallelism)

    b = parameter_breakdown(spec)
    one_expert = b["routed_experts"] // max(1, m.num_moe_layers * m.moe.num_routed_experts)
    saved = m.num_layers * act.attention + m.num_moe_layers * act.moe
    saved += (m.num_layers - m.num_moe_layers) * act.dense + act.head  # bytes per token
    bandwidth = hardware.bandwidth_bytes_per_s

    def step(imbalance: float) -> tuple[float, float]:
        # On the busiest device the routed experts' share of the work grows with the imbalance.
        expert_flops = 6 * m.num_moe_layers * m.moe.top_k * one_expert  # forward + backward, per token
        flops = (fl.training + expert_flops * (imbalance - 1.0)) * N * t.grad_accum_steps
        traffic = _ACTIVATION_TRAFFIC_FACTOR * saved * N * t.grad_accum_steps + _OPTIMIZER_TRAFFIC_BYTES * params
        dispatch = hardware.layer_overhead_seconds * m.num_layers * t.grad_accum_steps
        return flops / rate, traffic / bandwidth + dispatch

    compute, memory = step(1.0)
    worst_compute, worst_memory = step(_imbalance_factor(spec, g, parallelism))
    step_seconds = (compute + memory) * calibration
    tokens_per_step = spec.tokens_per_step * g
    # An evaluation micro-batch is a forward only: a third of the FLOPs, activations written once.
    eval_batch_seconds = (
        fl.forward * N / rate + saved * N / bandwidth + hardware.layer_overhead_seconds * m.num_layers / 3
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
        total_seconds=t.max_steps * step_seconds + eval_seconds,
        calibration_factor=calibration,
        precision_supported=supported,
    )


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
    num_gpus: int = 1,
    parallelism: Parallelism = "ddp",
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
        trial = _with_changes(spec, {**changes, **new})
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
    num_gpus: int = 1,
    parallelism: Parallelism = "ddp",
    calibration: float = 1.0,
    dataset_tokens: int | None = None,
) -> Estimate:
    """Parameters, FLOPs, memory (with the per-precision table), time, out-of-memory risk with its fixes,
    and the data budget of ``spec`` on ``num_gpus`` devices of ``hardware``.

    ``calibration`` multiplies predicted times (measured / predicted step time from a run on a worker of
    this hardware). ``dataset_tokens`` (tokens in the training data) adds epochs and tokens per parameter.
    """
    b = parameter_breakdown(spec)
    g = _devices(num_gpus, hardware)
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
    trained = spec.tokens_per_step * g * spec.training.max_steps
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
    )
