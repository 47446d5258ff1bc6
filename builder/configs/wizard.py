"""The wizard's reasoning: from a few answers to a proposed spec where every choice carries its reason.

``propose(answers, calibration=...)`` is pure (no database, no request): the views ask the questions and
show the result. The rules of thumb, in the order they are applied:

1. **Depth from the amount of data**: fewer than 100k examples → 6–12 layers; 100k–1M → 12–24; more than
   1M → 24–36. Speed starts at the shallow end, quality at the deep end. Width follows depth (about 64 per
   layer, GPT-3's proportions), heads of 64 dimensions (32 for narrow models) so they divide the width.
2. **The data caps the size**: at least half a token of data per parameter (below that a model memorises;
   ``workers.engine.lint`` warns at the same line).
3. **The budget caps the size**: the run must be able to read at least a minimum share of the data (quality:
   one epoch or 20 tokens per parameter, whichever is less; speed: half of that) within the hours given,
   on the hardware given; otherwise a smaller model is proposed and the reason says so.
4. **Memory**: the largest micro-batch that fits, accumulating to the target tokens per step; bf16 (fp16 on
   a T4) on GPUs for tensor-core speed; gradient checkpointing (and bf16 on CPU) only when memory is tight.
5. **Training**: SwiGLU experts, DeepSeek-style shared + routed experts with auxiliary-loss-free balancing,
   AdamW (β = 0.9/0.95, weight decay 0.01, clipping at 1.0), warmup then cosine decay to 10%, the learning
   rate that models of this size train with, dropout 0.1 when data is scarce, label smoothing 0.1 for
   classification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from workers.engine.estimate import (
    Estimate,
    count_parameters,
    estimate,
    estimate_memory,
    estimate_time,
    parameter_breakdown,
)
from workers.engine.hardware import PROFILES, HardwareProfile
from workers.engine.lint import OVERFIT_TOKENS_PER_PARAMETER, typical_learning_rate
from workers.engine.spec import Spec, load_spec

Task = Literal["generation", "classification"]
Priority = Literal["speed", "quality"]


@dataclass(frozen=True)
class DataSize:
    key: str
    label: str
    examples: int  # a representative count for the bucket (its geometric middle)
    layers: tuple[int, int]  # depth range
    vocab: int  # BPE vocabulary trained on it
    tokens_per_step: int  # target batch, in tokens


DATA_SIZES: dict[str, DataSize] = {
    d.key: d
    for d in (
        DataSize("tiny", "Under 10k examples (or a few MB, like the built-in Python docs)", 3_000, (6, 12), 2048, 4096),
        DataSize("small", "10k–100k examples", 30_000, (6, 12), 8192, 16_384),
        DataSize("medium", "100k–1M examples", 300_000, (12, 24), 16_384, 65_536),
        DataSize("large", "1M–10M examples", 3_000_000, (24, 36), 32_768, 262_144),
        DataSize("huge", "Over 10M examples", 30_000_000, (24, 36), 50_304, 524_288),
    )
}  # fmt: skip
# Tokens in a typical example: a document for generation, a short text for classification.
TOKENS_PER_EXAMPLE: dict[str, int] = {"generation": 250, "classification": 100}
HOURS_CHOICES: tuple[float, ...] = (0.25, 1, 4, 12, 24, 72, 168)
GPU_COUNTS: tuple[int, ...] = (1, 2, 4, 8)
WIDTHS: tuple[int, ...] = (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096)
MIN_STEPS = 100


@dataclass(frozen=True)
class Answers:
    """What the wizard asks. ``num_labels`` is used for classification only."""

    task: Task
    data_size: str
    hardware: str
    num_gpus: int
    hours: float
    priority: Priority
    num_labels: int = 2

    def __post_init__(self) -> None:
        # The forms validate each answer for the person; this guards the function's own contract.
        if self.task not in ("generation", "classification"):
            raise ValueError(f"task: {self.task!r} is not generation or classification")
        if self.data_size not in DATA_SIZES:
            raise ValueError(f"data_size: {self.data_size!r} is not one of {', '.join(DATA_SIZES)}")
        if self.hardware not in PROFILES:
            raise ValueError(f"hardware: {self.hardware!r} is not one of {', '.join(PROFILES)}")
        profile = PROFILES[self.hardware]
        if not 1 <= self.num_gpus <= profile.max_devices:
            raise ValueError(f"num_gpus: {profile.name} allows 1 to {profile.max_devices}")
        if not 0 < self.hours <= 24 * 365:
            raise ValueError("hours: must be more than 0 and at most a year")
        if self.priority not in ("speed", "quality"):
            raise ValueError(f"priority: {self.priority!r} is not speed or quality")
        if self.task == "classification" and not 2 <= self.num_labels <= 10000:
            raise ValueError("num_labels: between 2 and 10000")

    @property
    def dataset_tokens(self) -> int:
        return DATA_SIZES[self.data_size].examples * TOKENS_PER_EXAMPLE[self.task]


@dataclass
class Proposal:
    """The proposed spec, a reason per chosen field (dotted path → why) and remarks on the whole."""

    answers: Answers
    spec: Spec
    reasons: dict[str, str]
    notes: list[str] = field(default_factory=list)

    @property
    def hardware(self) -> HardwareProfile:
        return PROFILES[self.answers.hardware]


def _heads_for(width: int) -> int:
    head_dim = 32 if width <= 256 else 64 if width <= 1024 else 128
    return max(1, width // head_dim)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _shape_candidates(answers: Answers) -> list[tuple[int, int]]:
    """(layers, width) from the preferred shape down to the smallest, by parameter count."""
    low, high = DATA_SIZES[answers.data_size].layers
    preferred_layers = high if answers.priority == "quality" else low
    preferred_width = min(WIDTHS, key=lambda w: abs(w - 64 * preferred_layers))
    depths = sorted({2, 4, *range(low, high + 1, 2 if high <= 12 else 4), high})
    shapes = [(d, w) for d in depths for w in WIDTHS if w <= 4096 and abs(math.log2(w / (64 * d))) <= 1.2]
    # Narrow shallow shapes below every range, for small budgets and little data.
    shapes += [(2, 128), (2, 192), (4, 128), (4, 192), (4, 256)]
    shapes = sorted(set(shapes), key=lambda s: (s[0] * s[1] * s[1], s[0]), reverse=True)
    limit = preferred_layers * preferred_width * preferred_width
    return [s for s in shapes if s[0] * s[1] * s[1] <= limit]


def _moe_settings(width: int, answers: Answers) -> dict[str, Any]:
    """Routed/shared experts: fine-grained (16 experts, top-4) for quality on wide models, else 8, top-2."""
    fine = answers.priority == "quality" and width >= 512
    experts, top_k, shared = (16, 4, 1) if fine else (8, 2, 1)
    # The active feed-forward width (top_k + shared experts) matches a dense SwiGLU of 8/3 × width.
    expert_hidden = _round_to(8 / 3 * width / (top_k + shared), 32)
    return {
        "num_routed_experts": experts,
        "num_shared_experts": shared,
        "top_k": top_k,
        "expert_hidden_size": expert_hidden,
        "balancing": "aux_free",
        "scoring": "softmax",
    }


def _seq_len(answers: Answers, hardware: HardwareProfile) -> int:
    order = list(DATA_SIZES)
    index = order.index(answers.data_size)
    by_size = (128, 128, 256, 256, 512) if answers.task == "classification" else (128, 256, 512, 1024, 2048)
    seq = by_size[index]
    if hardware.kind == "cpu":
        seq = min(seq, 128 if answers.task == "classification" else 256)
    return seq


def _base_spec(answers: Answers, layers: int, width: int, seq: int) -> dict[str, Any]:
    data = DATA_SIZES[answers.data_size]
    hardware = PROFILES[answers.hardware]
    classification = answers.task == "classification"
    precision = "fp32"
    if hardware.kind == "gpu":
        precision = "bf16" if hardware.supports("bf16") else "fp16"
    return {
        "model": {
            "task": "classification" if classification else "causal_lm",
            "num_labels": answers.num_labels if classification else None,
            "vocab_size": data.vocab,
            "num_layers": layers,
            "hidden_size": width,
            "num_heads": _heads_for(width),
            "max_seq_len": seq,
            "activation": "swiglu",
            "dropout": 0.0,  # set once the size is known
            "moe": {**_moe_settings(width, answers), "first_dense_layers": 1 if layers >= 8 else 0},
        },
        "training": {
            "batch_size": 1,
            "grad_accum_steps": 1,
            "max_steps": 1000,
            "precision": precision,
            "gradient_checkpointing": False,
            "grad_clip": 1.0,
            "label_smoothing": 0.1 if classification else 0.0,
            "optimizer": {"betas": [0.9, 0.95], "weight_decay": 0.01},
            "schedule": {"kind": "cosine", "min_lr_ratio": 0.1},
        },
        "data": {"tokenizer": "bpe", "seq_len": seq},
    }


def _fits(spec: Spec, hardware: HardwareProfile, num_gpus: int) -> bool:
    mem = estimate_memory(spec, hardware, num_gpus=num_gpus)
    return mem.peak <= 0.85 * mem.capacity


def _fit_batch(raw: dict[str, Any], answers: Answers) -> tuple[Spec, list[str]] | None:
    """The largest micro-batch that fits (checkpointing, then bf16 on CPU, only when even 4 sequences do
    not), accumulating to the target tokens per step. None when nothing fits."""
    hardware = PROFILES[answers.hardware]
    seq = raw["data"]["seq_len"]
    target = DATA_SIZES[answers.data_size].tokens_per_step
    per_device = max(1, target // (seq * answers.num_gpus))
    largest = 1 << (per_device.bit_length() - 1)  # a power of two ≤ the target per device
    steps_taken: list[str] = []
    for setting in ("plain", "checkpointing", "bf16"):
        if setting == "checkpointing":
            raw["training"]["gradient_checkpointing"] = True
            steps_taken.append("checkpointing")
        if setting == "bf16":
            if raw["training"]["precision"] != "fp32" or not hardware.supports("bf16"):
                continue
            raw["training"]["precision"] = "bf16"
            steps_taken.append("bf16")
        batch = largest
        smallest_ok = 4 if setting == "plain" else 1
        while batch >= min(smallest_ok, largest):
            raw["training"]["batch_size"] = batch
            raw["training"]["grad_accum_steps"] = max(1, math.ceil(per_device / batch))
            spec = load_spec(raw)
            if _fits(spec, hardware, answers.num_gpus):
                return spec, steps_taken
            batch //= 2
    return None


def propose(answers: Answers, *, calibration: float = 1.0) -> Proposal:
    """A spec for ``answers`` with a reason for every choice (see the module docstring for the rules).

    ``calibration`` is the hardware's measured / predicted step-time factor, so that budgets are judged on
    measured speed when a worker has calibrated the profile.
    """
    hardware = PROFILES[answers.hardware]
    data = DATA_SIZES[answers.data_size]
    dataset_tokens = answers.dataset_tokens
    seq = _seq_len(answers, hardware)
    budget_seconds = answers.hours * 3600 * (0.9 if answers.priority == "quality" else 0.5)
    minimum_share = 1.0 if answers.priority == "quality" else 0.5
    max_epochs = 4.0 if answers.priority == "quality" else 1.0
    low, high = data.layers
    notes: list[str] = []
    chosen: tuple[Spec, list[str], int, str] | None = None
    fallback: tuple[Spec, list[str], int, str] | None = None
    cut_by = ""  # why the shape just above the chosen one was rejected: "budget" or "data"

    for layers, width in _shape_candidates(answers):
        raw = _base_spec(answers, layers, width, seq)
        # Dropout where data is scarce for the model (under Chinchilla's ~20 tokens per parameter); decided
        # before the batch is fitted because its masks take memory.
        raw["model"]["dropout"] = 0.1 if dataset_tokens < 20 * count_parameters(load_spec(raw)) else 0.0
        fitted = _fit_batch(raw, answers)
        if fitted is None:
            continue
        spec, memory_steps = fitted
        total = count_parameters(spec)
        too_big_for_data = total * OVERFIT_TOKENS_PER_PARAMETER > dataset_tokens
        needed = minimum_share * min(dataset_tokens, 20 * total)
        step_seconds = estimate_time(spec, hardware, num_gpus=answers.num_gpus, calibration=calibration).step_seconds
        tokens_per_step = spec.tokens_per_step * answers.num_gpus
        affordable_steps = int(budget_seconds / step_seconds)
        why = "budget" if affordable_steps * tokens_per_step < needed else ("data" if too_big_for_data else "")
        candidate = (spec, memory_steps, affordable_steps, why)
        fallback = candidate  # the smallest so far
        if not why:
            chosen = candidate
            break
        cut_by = why
    if chosen is None:
        if fallback is None:
            raise ValueError("no model fits this hardware")  # impossible: the smallest shape fits any profile
        chosen = fallback
        cut_by = fallback[3]
        notes.append(
            "Even the smallest model cannot read the minimum share of the data within the budget: "
            "more hours, more or faster GPUs, or less data would help."
            if fallback[3] == "budget"
            else "Even the smallest model has more parameters than the data has tokens: expect overfitting; "
            "collect more data if you can."
        )
    spec, memory_steps, affordable_steps, _ = chosen
    tokens_per_step = spec.tokens_per_step * answers.num_gpus
    wanted_steps = math.ceil(max_epochs * dataset_tokens / tokens_per_step)
    steps = max(MIN_STEPS, min(affordable_steps, wanted_steps))
    if affordable_steps < MIN_STEPS:
        notes.append(f"The budget allows only about {affordable_steps} steps; {MIN_STEPS} are proposed anyway.")
    warmup = min(2000, max(10, steps // 20))
    non_embedding = parameter_breakdown(spec)["active"] - parameter_breakdown(spec)["embedding"]
    lr = float(f"{typical_learning_rate(non_embedding):.1e}")
    raw = spec.model_dump(mode="json")
    t = raw["training"]
    t["max_steps"] = steps
    t["schedule"]["warmup_steps"] = warmup
    t["optimizer"]["lr"] = lr
    t["eval_interval"] = max(10, steps // 20)
    t["eval_batches"] = 4 if hardware.kind == "cpu" else 8
    t["checkpoint_interval"] = max(10, min(steps, steps // 10 or 1))
    spec = load_spec(raw)

    reasons = _reasons(answers, spec, memory_steps, affordable_steps, wanted_steps, low, high, calibration, cut_by)
    if spec.model.num_layers < low:
        because = (
            f"so that training fits {answers.hours:g} h on {hardware.name}"
            if cut_by == "budget"
            else f"because the data (about {dataset_tokens / 1e6:.1f}M tokens) is too small for a deeper model"
        )
        notes.append(f"The data suggests {low}–{high} layers; {spec.model.num_layers} are proposed {because}.")
    return Proposal(answers=answers, spec=spec, reasons=reasons, notes=notes)


def _reasons(
    answers: Answers,
    spec: Spec,
    memory_steps: list[str],
    affordable_steps: int,
    wanted_steps: int,
    low: int,
    high: int,
    calibration: float,
    cut_by: str,
) -> dict[str, str]:
    hardware = PROFILES[answers.hardware]
    data = DATA_SIZES[answers.data_size]
    m, t, d = spec.model, spec.training, spec.data
    b = parameter_breakdown(spec)
    gpus = f"{answers.num_gpus} × {hardware.name}" if answers.num_gpus > 1 else hardware.name
    r: dict[str, str] = {}
    r["model.task"] = (
        "You asked for classification: a label head on the last token's hidden state."
        if m.task == "classification"
        else "You asked for generation: next-token prediction (causal language modelling)."
    )
    if m.task == "classification":
        r["model.num_labels"] = f"The number of classes you gave ({m.num_labels})."
    end = "the shallow end for speed" if answers.priority == "speed" else "the deep end for quality"
    depth_rule = f"{data.label} → {low}–{high} layers ({end})."
    if m.num_layers < (high if answers.priority == "quality" else low):
        depth_rule += (
            f" Cut to {m.num_layers} so that training fits {answers.hours:g} h on {gpus}."
            if cut_by == "budget"
            else f" Cut to {m.num_layers}: a deeper model would have too many parameters for the data."
        )
    r["model.num_layers"] = depth_rule
    r["model.hidden_size"] = (
        f"About 64 per layer (GPT-3's proportions), then capped so the model has at most two parameters per "
        f"token of data ({answers.dataset_tokens / 1e6:.1f}M tokens estimated) and fits the budget: "
        f"{b['total'] / 1e6:.1f}M parameters, {b['active'] / 1e6:.1f}M active per token."
    )
    r["model.num_heads"] = (
        f"{m.num_heads} heads of {m.head_dim} dimensions: they divide the hidden size, and {m.head_dim} is a "
        "multiple of 8 that attention kernels handle well."
    )
    r["model.activation"] = "SwiGLU: a better loss than GELU/ReLU at the same compute (LLaMA, DeepSeek)."
    moe = m.moe
    r["model.moe.num_routed_experts"] = (
        f"{moe.num_routed_experts} routed experts, each token to {moe.top_k}: "
        + (
            "fine-grained experts specialise better at the same active size (DeepSeekMoE)."
            if moe.num_routed_experts > 8
            else "a few experts keep each expert's batch large and the step fast."
        )
        + (f" Divisible by {answers.num_gpus} GPUs for expert parallelism." if answers.num_gpus > 1 else "")
    )
    r["model.moe.top_k"] = f"{moe.top_k} of {moe.num_routed_experts}: compute per token stays small."
    r["model.moe.num_shared_experts"] = "One shared expert sees every token and holds common knowledge (DeepSeekMoE)."
    r["model.moe.expert_hidden_size"] = (
        f"The active feed-forward ({moe.top_k} routed + {moe.num_shared_experts} shared × {moe.expert_hidden_size}) "
        f"matches a dense SwiGLU of 8/3 × {m.hidden_size}."
    )
    r["model.moe.balancing"] = (
        "Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias steers routing without a loss term that "
        "competes with the language loss."
    )
    r["model.moe.first_dense_layers"] = (
        "The first layer is dense: routing on raw embeddings is unstable (DeepSeek keeps 1–3 dense layers)."
        if moe.first_dense_layers
        else "All layers MoE: the model is shallow enough that a dense first layer is not needed."
    )
    r["model.vocab_size"] = (
        f"A {m.vocab_size}-token BPE vocabulary trained on your data suits {data.label.split(' (')[0].lower()}; "
        "a multiple of 64 keeps the output matmul fast."
    )
    r["data.tokenizer"] = "Byte-level BPE trained on your data: shorter sequences than bytes, no unknown tokens."
    r["data.seq_len"] = (
        f"{d.seq_len} tokens per sequence: "
        + ("enough for most texts to classify" if m.task == "classification" else "context for generation")
        + (", kept short on a CPU." if hardware.kind == "cpu" else f" for {data.label.split(' (')[0].lower()}.")
    )
    r["model.max_seq_len"] = "Positions up to the training sequence length."
    r["model.dropout"] = (
        "Dropout 0.1: under ~20 tokens of data per parameter (Chinchilla), so regularise."
        if m.dropout > 0
        else "No dropout: over 20 tokens of data per parameter, the model underfits rather than overfits."
    )
    r["training.optimizer.weight_decay"] = "AdamW weight decay 0.01: mild regularisation of the matrices."
    r["training.optimizer.betas"] = "β₂ = 0.95 adapts to the gradient spikes that routing causes (LLaMA, DeepSeek)."
    r["training.grad_clip"] = "Clipping the gradient norm at 1.0 absorbs occasional router spikes."
    tokens_step = spec.tokens_per_step * answers.num_gpus
    memory_note = ""
    if "checkpointing" in memory_steps:
        memory_note = " Memory is tight: gradient checkpointing recomputes activations in backward."
    r["training.batch_size"] = (
        f"Micro-batch {t.batch_size}: as large as memory allows (aiming at {data.tokens_per_step:,} tokens per "
        f"step).{memory_note}"
    )
    r["training.grad_accum_steps"] = (
        f"{t.grad_accum_steps} accumulation step{'s' if t.grad_accum_steps > 1 else ''} → "
        f"{tokens_step:,} tokens per optimizer step"
        + (f" over {answers.num_gpus} GPUs." if answers.num_gpus > 1 else ".")
    )
    if t.precision == "fp32":
        r["training.precision"] = "fp32: this CPU trains fastest and most simply in full precision here."
    elif hardware.kind == "gpu":
        r["training.precision"] = (
            f"{t.precision}: tensor cores run it several times faster than fp32, and most activations take half "
            "the memory" + ("; the T4 has no bf16, so fp16 with loss scaling." if t.precision == "fp16" else ".")
        )
    else:
        r["training.precision"] = "bf16: memory is tight on this CPU, and it has bf16 matrix units (AMX)."
    r["training.gradient_checkpointing"] = (
        "On: without it not even a small micro-batch fits in memory (about ⅓ more compute)."
        if t.gradient_checkpointing
        else "Off: activations fit, and recomputing them would cost about ⅓ more compute."
    )
    budget_steps = f"{affordable_steps:,}"
    r["training.max_steps"] = (
        f"{t.max_steps:,} steps = {t.max_steps * tokens_step / 1e6:,.1f}M tokens: "
        f"{'up to 4 passes over the data' if answers.priority == 'quality' else 'one pass over the data'} "
        f"({wanted_steps:,} steps), within what {answers.hours:g} h on {gpus} affords "
        f"({budget_steps} steps at the predicted speed"
        + (f", calibrated ×{calibration:.2f}" if calibration != 1.0 else "")
        + ")."
    )
    r["training.optimizer.lr"] = (
        f"{t.optimizer.lr:g}: the peak rate models of about {(b['active'] - b['embedding']) / 1e6:.1f}M active "
        "non-embedding parameters train with (GPT-3's table, extended to small models)."
    )
    r["training.schedule.warmup_steps"] = (
        f"{t.schedule.warmup_steps} warmup steps (~5% of the run, at most 2000): AdamW's statistics settle first."
    )
    r["training.schedule.kind"] = "Cosine decay to 10% of the peak: a better final loss than a constant rate."
    if m.task == "classification":
        r["training.label_smoothing"] = "Label smoothing 0.1: better-calibrated, less over-confident classifiers."
    r["training.eval_interval"] = f"Validation every {t.eval_interval} steps: about 20 points on the loss curve."
    r["training.checkpoint_interval"] = f"A checkpoint every {t.checkpoint_interval} steps, so a stop loses little."
    return r


def estimate_proposal(proposal: Proposal, *, calibration: float = 1.0) -> Estimate:
    """The estimate the wizard shows next to a proposal (on the answers' hardware and GPU count)."""
    return estimate(
        proposal.spec,
        proposal.hardware,
        num_gpus=proposal.answers.num_gpus,
        calibration=calibration,
        dataset_tokens=proposal.answers.dataset_tokens,
    )
