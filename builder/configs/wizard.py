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
   a T4) on GPUs for tensor-core speed, bf16 on a CPU with native bf16 units (AMX or AVX-512 BF16: faster at
   the same validation loss, ``python -m bench.precision``), fp32 on other CPUs; gradient checkpointing (then bf16
   on a CPU that has it) only when memory is tight.
5. **Training**: SwiGLU experts, DeepSeek-style shared + routed experts with auxiliary-loss-free balancing,
   AdamW (β = 0.9/0.95, weight decay 0.01, clipping at 1.0), warmup then cosine decay to 10%, the learning
   rate that models of this size train with, dropout 0.1 when data is scarce, label smoothing 0.1 for
   classification.
6. **Attention from how the model is used**: short texts (or classification) → multi-head attention; long
   generation (long documents or conversations, many sequences served at once: the KV cache dominates memory) →
   multi-head latent attention for quality (DeepSeek-V2: a compressed cache, MHA's quality), grouped-query
   attention for speed (the cheapest step with a small cache); on a GPU long generation also trains on longer
   sequences.
7. **DeepSeek-V3's training choices**: multi-token prediction (one module) for quality generation when the
   budget affords every pass over the data the run wants even with MTP's extra cost (it then adds training
   signal per token; when the budget is the limit, plain next-token steps are worth more); group-limited
   routing with one group per GPU when experts are spread over several (each token reaches at most half of
   them); sigmoid router scores with the aux-free bias, as DeepSeek-V3 (the export then loads in transformers),
   and a routed scaling factor of 1 (the chosen experts' weights sum to 1). The optimizer: Adafactor
   when memory is tight (gradient checkpointing needed), Muon for quality on a GPU when the estimator says its
   Newton-Schulz iterations add at most ``MUON_MAX_EXTRA`` to the step (on a CPU they cost more than estimated,
   and AdamW won at equal time on the tiny demo: ``make bench``), else fused AdamW; the schedule:
   warmup-stable-decay when the run may be continued later, else cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from builder.core.formatting import approx_duration, human_bytes
from workers.engine.estimate import (
    Estimate,
    count_parameters,
    estimate,
    estimate_compile_seconds,
    estimate_memory,
    estimate_time,
    kv_cache_bytes_per_token,
    optimizer_state_elements,
    parameter_breakdown,
)
from workers.engine.hardware import PROFILES, HardwareProfile
from workers.engine.lint import OVERFIT_TOKENS_PER_PARAMETER, typical_learning_rate
from workers.engine.spec import Spec, load_spec

Task = Literal["generation", "classification"]
Priority = Literal["speed", "quality"]
Context = Literal["short", "long"]


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
# Muon is proposed for quality only while its Newton-Schulz iterations add at most this share to the step.
MUON_MAX_EXTRA = 0.10
# training.compile stays off (its default): what bench.compile measured for this platform's CPU templates, said
# in its reason so a person knows when to turn it on.
COMPILE_STEP_SAVING_NOTE = (
    "steps took 0.96-1.07x the eager time on this platform's CPU templates (tiny demo 0.96-1.0, small-moe "
    "0.96-0.98, text classifier 1.0-1.07, whose template therefore trains eager; bench.compile)."
)
# The most of a step compiling saved in those measurements (0.96x): what a run's reason weighs against the compile.
COMPILE_BEST_STEP_SAVING = 0.04


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
    context: Context = "short"  # how long the texts the model generates from and into are
    continue_later: bool = False  # the run may be trained further later (more steps or new data)
    # The profile of ``hardware`` as the caller resolved it (the views: the CPU's with its workers' measured
    # rates, ``builder.core.profiles``); None: ``PROFILES[hardware]``. Keeps ``propose`` free of the database.
    profile: HardwareProfile | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # The forms validate each answer for the person; this guards the function's own contract.
        if self.task not in ("generation", "classification"):
            raise ValueError(f"task: {self.task!r} is not generation or classification")
        if self.data_size not in DATA_SIZES:
            raise ValueError(f"data_size: {self.data_size!r} is not one of {', '.join(DATA_SIZES)}")
        if self.hardware not in PROFILES:
            raise ValueError(f"hardware: {self.hardware!r} is not one of {', '.join(PROFILES)}")
        if self.profile is not None and self.profile.key != self.hardware:
            raise ValueError(f"profile: {self.profile.key!r} is not the profile of hardware {self.hardware!r}")
        profile = self.hardware_profile
        if not 1 <= self.num_gpus <= profile.max_devices:
            raise ValueError(f"num_gpus: {profile.name} allows 1 to {profile.max_devices}")
        if not 0 < self.hours <= 24 * 365:
            raise ValueError("hours: must be more than 0 and at most a year")
        if self.priority not in ("speed", "quality"):
            raise ValueError(f"priority: {self.priority!r} is not speed or quality")
        if self.task == "classification" and not 2 <= self.num_labels <= 10000:
            raise ValueError("num_labels: between 2 and 10000")
        if self.context not in ("short", "long"):
            raise ValueError(f"context: {self.context!r} is not short or long")

    @property
    def hardware_profile(self) -> HardwareProfile:
        return self.profile if self.profile is not None else PROFILES[self.hardware]

    @property
    def long_generation(self) -> bool:
        return self.task == "generation" and self.context == "long"

    @property
    def dataset_tokens(self) -> int:
        return DATA_SIZES[self.data_size].examples * TOKENS_PER_EXAMPLE[self.task]


@dataclass(frozen=True)
class Choices:
    """What the proposal measured while choosing: the reasons quote it."""

    adamw_step_seconds: float = 0.0  # the chosen shape's step with AdamW
    muon_step_seconds: float = 0.0  # ... with Muon
    mtp_step_seconds: float | None = None  # ... with one MTP module (None: not considered)
    mtp_affordable_steps: int = 0
    mtp_blocked: str = ""  # why MTP is out whatever the budget: "memory" or "data" (its module's parameters)
    wanted_steps: int = 0


@dataclass
class Proposal:
    """The proposed spec, a reason per chosen field (dotted path → why) and remarks on the whole."""

    answers: Answers
    spec: Spec
    reasons: dict[str, str]
    notes: list[str] = field(default_factory=list)

    @property
    def hardware(self) -> HardwareProfile:
        return self.answers.hardware_profile


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
    """Routed/shared experts: fine-grained (16 experts, top-4) for quality on wide models, else 8, top-2.
    Several GPUs: one expert group per GPU, each token routed within half of them (at least enough groups for
    its top-k)."""
    fine = answers.priority == "quality" and width >= 512
    experts, top_k, shared = (16, 4, 1) if fine else (8, 2, 1)
    # The active feed-forward width (top_k + shared experts) matches a dense SwiGLU of 8/3 × width.
    expert_hidden = _round_to(8 / 3 * width / (top_k + shared), 32)
    groups = answers.num_gpus if answers.num_gpus > 1 and experts % answers.num_gpus == 0 else 1
    per_group = experts // groups
    return {
        "num_routed_experts": experts,
        "num_shared_experts": shared,
        "top_k": top_k,
        "expert_hidden_size": expert_hidden,
        "balancing": "aux_free",
        "scoring": "sigmoid",
        "n_group": groups,
        "topk_group": max(math.ceil(top_k / per_group), groups // 2) if groups > 1 else 1,
        "routed_scaling_factor": 1.0,
    }


def _attention_settings(width: int, answers: Answers) -> dict[str, Any]:
    """Multi-head attention, unless the model generates long texts: then latent attention (quality) or
    grouped-query attention (speed). MLA's shape follows DeepSeek-V2(-Lite): per head ``head_dim`` dimensions
    without position and ``head_dim / 2`` rotary ones, values a head wide, a latent of a quarter of the width
    (at least 2 heads' worth, at most 512) and compressed queries only on wide models."""
    heads = _heads_for(width)
    if not answers.long_generation:
        return {"attention": "mha", "num_kv_heads": None}
    head_dim = width // heads
    if answers.priority == "speed":
        kv_heads = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // 4))
        return {"attention": "gqa", "num_kv_heads": kv_heads}
    mla = {
        "q_lora_rank": 0 if width < 2048 else min(1536, width // 2),
        "kv_lora_rank": min(512, max(2 * head_dim, width // 4)),
        "qk_nope_head_dim": head_dim,
        "qk_rope_head_dim": head_dim // 2,
        "v_head_dim": head_dim,
    }
    return {"attention": "mla", "num_kv_heads": None, "mla": mla}


def _seq_len(answers: Answers, hardware: HardwareProfile) -> int:
    order = list(DATA_SIZES)
    index = order.index(answers.data_size)
    by_size = (128, 128, 256, 256, 512) if answers.task == "classification" else (128, 256, 512, 1024, 2048)
    seq = by_size[index]
    if answers.long_generation and hardware.kind == "gpu":
        seq = min(4096, 2 * seq)  # long generation: train on the longer contexts it will see
    if hardware.kind == "cpu":
        seq = min(seq, 128 if answers.task == "classification" else 256)
    return seq


def _base_spec(answers: Answers, layers: int, width: int, seq: int) -> dict[str, Any]:
    data = DATA_SIZES[answers.data_size]
    hardware = answers.hardware_profile
    classification = answers.task == "classification"
    precision = "fp32"
    if hardware.kind == "gpu":
        precision = "bf16" if hardware.supports("bf16") else "fp16"
    elif hardware.supports("bf16"):
        # The CPU profile offers bf16 only with native units (AMX or AVX-512 BF16); there bf16 autocast trained
        # faster than fp32 with the same validation loss (``python -m bench.precision``). Elsewhere it would be
        # emulated, slower than fp32.
        precision = "bf16"
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
            **_attention_settings(width, answers),
            "moe": {**_moe_settings(width, answers), "first_dense_layers": 1 if layers >= 8 else 0},
        },
        "training": {
            "batch_size": answers.num_gpus,  # one sequence per device until the batch is fitted
            "grad_accum_steps": 1,
            "max_steps": 1000,
            "precision": precision,
            "gradient_checkpointing": False,
            "grad_clip": 1.0,
            "label_smoothing": 0.1 if classification else 0.0,
            "optimizer": {"betas": [0.9, 0.95], "weight_decay": 0.01},
            "schedule": {"kind": "cosine", "min_lr_ratio": 0.1},
            # The job runs on the GPUs asked for (torch.distributed, data parallel): batch_size is then the global
            # micro-batch, split evenly over them.
            "distributed": {"devices": answers.num_gpus, "strategy": "ddp", "expert_parallel": False},
        },
        "data": {"tokenizer": "bpe", "seq_len": seq},
    }


def _fits(spec: Spec, hardware: HardwareProfile, num_gpus: int) -> bool:
    mem = estimate_memory(spec, hardware, num_gpus=num_gpus)
    return mem.peak <= 0.85 * mem.capacity


def _fit_batch(raw: dict[str, Any], answers: Answers) -> tuple[Spec, list[str]] | None:
    """The largest micro-batch that fits (checkpointing, then bf16 on CPU, only when even 4 sequences do
    not), accumulating to the target tokens per step. None when nothing fits."""
    hardware = answers.hardware_profile
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
        batch = largest  # per device
        smallest_ok = 4 if setting == "plain" else 1
        while batch >= min(smallest_ok, largest):
            raw["training"]["batch_size"] = batch * answers.num_gpus  # the global micro-batch
            raw["training"]["grad_accum_steps"] = max(1, math.ceil(per_device / batch))
            spec = load_spec(raw)
            if _fits(spec, hardware, answers.num_gpus):
                return spec, steps_taken
            batch //= 2
    return None


def _changed(spec: Spec, model: dict[str, Any] | None = None, training: dict[str, Any] | None = None) -> Spec:
    raw = spec.model_dump(mode="json")
    raw["model"].update(model or {})
    raw["training"].update(training or {})
    return load_spec(raw)


_MUON = {"name": "muon", "weight_decay": 0.01, "adamw_weight_decay": 0.01, "adamw_betas": [0.9, 0.95]}
_ADAFACTOR = {"name": "adafactor", "weight_decay": 0.01}


def _training_choices(
    spec: Spec,
    answers: Answers,
    memory_steps: list[str],
    budget_seconds: float,
    wanted_steps: int,
    calibration: float,
) -> tuple[Spec, int, Choices]:
    """The optimizer and multi-token prediction for the chosen shape (rule 7), and the steps the budget then
    affords. The schedule follows later with the step count."""
    hardware = answers.hardware_profile

    def step_seconds(candidate: Spec) -> float:
        return estimate_time(candidate, hardware, num_gpus=answers.num_gpus, calibration=calibration).step_seconds

    adamw = step_seconds(spec)
    muon_spec = _changed(spec, training={"optimizer": _MUON})
    muon = step_seconds(muon_spec)
    if "checkpointing" in memory_steps:
        spec = _changed(spec, training={"optimizer": _ADAFACTOR})
    elif answers.priority == "quality" and hardware.kind == "gpu" and muon <= (1 + MUON_MAX_EXTRA) * adamw:
        spec = muon_spec
    affordable = int(budget_seconds / step_seconds(spec))
    mtp_seconds: float | None = None
    mtp_affordable = 0
    blocked = ""
    if answers.task == "generation":
        mtp_spec = _changed(spec, model={"mtp_depth": 1})
        mtp_seconds = step_seconds(mtp_spec)
        mtp_affordable = int(budget_seconds / mtp_seconds)
        if not _fits(mtp_spec, hardware, answers.num_gpus):
            blocked = "memory"
        elif count_parameters(mtp_spec) * OVERFIT_TOKENS_PER_PARAMETER > answers.dataset_tokens:
            blocked = "data"  # (the module's parameters would take the model past what the data carries)
        if answers.priority == "quality" and not blocked and mtp_affordable >= wanted_steps:
            spec, affordable = mtp_spec, mtp_affordable
    choices = Choices(
        adamw_step_seconds=adamw,
        muon_step_seconds=muon,
        mtp_step_seconds=mtp_seconds,
        mtp_affordable_steps=mtp_affordable,
        mtp_blocked=blocked,
        wanted_steps=wanted_steps,
    )
    return spec, affordable, choices


def propose(answers: Answers, *, calibration: float = 1.0) -> Proposal:
    """A spec for ``answers`` with a reason for every choice (see the module docstring for the rules).

    ``calibration`` is the hardware's measured / predicted step-time factor, so that budgets are judged on
    measured speed when a worker has calibrated the profile.
    """
    hardware = answers.hardware_profile
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
        tokens_per_step = spec.tokens_per_step  # global: batch_size spans the GPUs
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
    tokens_per_step = spec.tokens_per_step
    wanted_steps = math.ceil(max_epochs * dataset_tokens / tokens_per_step)
    spec, affordable_steps, choices = _training_choices(
        spec, answers, memory_steps, budget_seconds, wanted_steps, calibration
    )
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
    if answers.continue_later:
        t["schedule"].update(kind="wsd", decay_fraction=0.2)
    if t["optimizer"]["name"] in ("adamw", "muon"):  # (Adafactor's rate is relative: its default stays)
        t["optimizer"]["lr"] = lr
    if t["optimizer"]["name"] == "muon":
        t["optimizer"]["adamw_lr"] = lr
    t["eval_interval"] = max(10, steps // 20)
    t["eval_batches"] = 4 if hardware.kind == "cpu" else 8
    t["checkpoint_interval"] = max(10, min(steps, steps // 10 or 1))
    spec = load_spec(raw)

    reasons = _reasons(answers, spec, memory_steps, affordable_steps, wanted_steps, low, high, calibration, cut_by)
    _deepseek_reasons(answers, spec, choices, reasons)
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
    hardware = answers.hardware_profile
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
    r["model.moe.scoring"] = (
        "Sigmoid router scores, as DeepSeek-V3 pairs them with that bias: each expert is scored on its own and the "
        "chosen ones' weights are normalised; its Hugging Face export then loads in transformers."
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
    tokens_step = spec.tokens_per_step
    memory_note = ""
    if "checkpointing" in memory_steps:
        memory_note = " Memory is tight: gradient checkpointing recomputes activations in backward."
    r["training.batch_size"] = (
        f"Micro-batch {t.batch_size}"
        + (f" ({t.batch_size // answers.num_gpus} per GPU)" if answers.num_gpus > 1 else "")
        + f": as large as memory allows (aiming at {data.tokens_per_step:,} tokens per step).{memory_note}"
    )
    r["training.grad_accum_steps"] = (
        f"{t.grad_accum_steps} accumulation step{'s' if t.grad_accum_steps > 1 else ''} → "
        f"{tokens_step:,} tokens per optimizer step"
        + (f" over {answers.num_gpus} GPUs." if answers.num_gpus > 1 else ".")
    )
    if t.precision == "fp32" and hardware.kind == "cpu":
        r["training.precision"] = (
            "fp32: this CPU has no native bf16 units (AVX-512 BF16 or AMX), so bf16 would be emulated, slower than "
            "full precision."
        )
    elif t.precision == "fp32":
        r["training.precision"] = "fp32: this device trains fastest and most simply in full precision here."
    elif hardware.kind == "gpu":
        r["training.precision"] = (
            f"{t.precision}: tensor cores run it several times faster than fp32, and most activations take half "
            "the memory" + ("; the T4 has no bf16, so fp16 with loss scaling." if t.precision == "fp16" else ".")
        )
    else:
        r["training.precision"] = (
            "bf16: this CPU multiplies bf16 natively (AMX or AVX-512 BF16), several times faster than fp32; autocast "
            "trains in it with fp32 master weights and optimizer, and on this platform's CPU reached the same "
            "validation loss as fp32 (within 2%) in less time. Activations take half the memory."
        )
    r["training.gradient_checkpointing"] = (
        "On: without it not even a small micro-batch fits in memory (about ⅓ more compute)."
        if t.gradient_checkpointing
        else "Off: activations fit, and recomputing them would cost about ⅓ more compute."
    )
    compiled = spec.model_copy(update={"training": t.model_copy(update={"compile": True})})
    compile_seconds = estimate_compile_seconds(compiled)
    # Weighed on this run's own numbers: a reason that said "worth it for runs of more than a few hundred steps"
    # beside a proposal of 733 steps that left it off read as a contradiction (what pays is seconds, not steps).
    steps_seconds = (
        t.max_steps * estimate_time(spec, hardware, num_gpus=answers.num_gpus, calibration=calibration).step_seconds
    )
    saving = COMPILE_BEST_STEP_SAVING * steps_seconds
    r["training.compile"] = (
        f"{'On' if t.compile else 'Off'}: torch.compile first compiles the model's blocks (about "
        f"{approx_duration(compile_seconds)} before the first step), then fuses their elementwise work: "
        f"{COMPILE_STEP_SAVING_NOTE} Over this run's {approx_duration(steps_seconds)} of steps it would save at most "
        f"about {approx_duration(saving)}, "
        + (
            "less than the compile takes."
            if saving < compile_seconds
            else "more than the compile takes: worth trying (the estimate counts the compile when it is on)."
        )
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


def _more(seconds: float | None, than: float) -> str:
    """``seconds`` as a share more than ``than``: "+12%"."""
    return f"+{max(0.0, (seconds or than) / than - 1):.0%}"


def _deepseek_reasons(answers: Answers, spec: Spec, choices: Choices, r: dict[str, str]) -> None:
    """Add to ``r`` the reasons for the choices of rules 6 and 7 (attention, MTP, group-limited routing, the
    routed scaling factor, the optimizer and the schedule), replacing the plain AdamW/cosine reasons of
    ``_reasons`` where those differ."""
    m, t, moe = spec.model, spec.training, spec.model.moe
    # -- attention, from the use ---------------------------------------------------------------------------
    kv = kv_cache_bytes_per_token(spec)
    mha_kv = m.num_layers * 2 * m.hidden_size * 4  # keys and values of every head, fp32
    per_seq = f"{human_bytes(kv * m.max_seq_len)} for a full {m.max_seq_len}-token sequence"
    if m.task == "classification":
        r["model.attention"] = (
            "Multi-head attention: classification reads each text once and keeps no KV cache, so latent or "
            "grouped-query attention would have nothing to save."
        )
    elif m.attention == "mha":
        r["model.attention"] = (
            f"Multi-head attention: with short texts the KV cache ({human_bytes(kv)} per token, {per_seq}) is not "
            "what limits generation, and MHA trains fastest. For long generation the wizard proposes latent "
            "attention (MLA), whose compressed cache is several times smaller."
        )
    elif m.attention == "mla":
        r["model.attention"] = (
            f"Multi-head latent attention (DeepSeek-V2/V3): you generate long texts, where the KV cache limits "
            f"how long and how many sequences fit. MLA caches a latent and one rotary key per token and layer: "
            f"{human_bytes(kv)} per token against multi-head attention's {human_bytes(mha_kv)} "
            f"({mha_kv / kv:.1f}× smaller, {per_seq}), with MHA's quality (DeepSeek-V2); its projections cost "
            "some compute per step. Grouped-query attention shrinks the cache too, at some cost in quality."
        )
        r["model.mla.kv_lora_rank"] = (
            f"A latent of {m.mla.kv_lora_rank} numbers (a quarter of the hidden size, within DeepSeek's 512): "
            "keys and values are up-projected from it, and it is what the cache keeps."
        )
        r["model.mla.qk_rope_head_dim"] = (
            f"{m.mla.qk_rope_head_dim} rotary dimensions per head (half a head, as DeepSeek-V2): position enters "
            "through a separate key shared by every head (decoupled RoPE), so the latent stays free of position "
            "and the cache small."
        )
        r["model.mla.qk_nope_head_dim"] = f"{m.mla.qk_nope_head_dim}: a head's worth of dimensions without position."
        r["model.mla.v_head_dim"] = f"{m.mla.v_head_dim}: values a head wide, as multi-head attention's."
        r["model.mla.q_lora_rank"] = (
            "0: queries are projected directly (DeepSeek-V2-Lite); compressing them saves memory only on wide models."
            if m.mla.q_lora_rank == 0
            else f"Queries compressed to {m.mla.q_lora_rank} (DeepSeek-V2/V3 on wide models): less activation "
            "memory in training."
        )
    else:
        r["model.attention"] = (
            f"Grouped-query attention: you generate long texts and asked for speed. {m.kv_heads} key/value heads "
            f"shared by {m.num_heads} query heads cache {human_bytes(kv)} per token against multi-head "
            f"attention's {human_bytes(mha_kv)} ({mha_kv / kv:.1f}× smaller, {per_seq}) at no extra cost per "
            "step; latent attention keeps MHA's quality but its projections cost more per step."
        )
        r["model.num_kv_heads"] = (
            f"{m.kv_heads} key/value heads, about a quarter of the query heads: the cache shrinks "
            f"{m.num_heads // m.kv_heads}× (LLaMA-2 70B: 8 of 64)."
        )
    if answers.long_generation and spec.data.seq_len > 256:
        r["data.seq_len"] = f"{spec.data.seq_len} tokens per sequence: twice the usual, for long generation."
    # -- multi-token prediction ------------------------------------------------------------------------------
    mtp_cost = _more(choices.mtp_step_seconds, _step_without_mtp(choices, t.optimizer.name))
    if m.task == "classification":
        r["model.mtp_depth"] = "No multi-token prediction: classification predicts a label, not tokens."
    elif m.mtp_depth:
        r["model.mtp_depth"] = (
            f"One multi-token prediction module (DeepSeek-V3): each position also predicts the token after next, "
            f"a denser training signal from the same data. It makes a step {mtp_cost} longer (estimated), and the "
            f"budget still affords {choices.mtp_affordable_steps:,} steps, more than the {choices.wanted_steps:,} "
            "the data asks for. Generation ignores the module."
        )
        r["training.mtp_loss_weight"] = (
            f"{t.mtp_loss_weight:g}: DeepSeek-V3's weight for most of its training (0.1 at the end): the extra "
            "loss helps the next-token loss without pulling it off course."
        )
    else:
        if answers.priority == "speed":
            why = (
                f"each step would take {mtp_cost} longer (another block and output head per token), and you "
                "asked for speed."
            )
        elif choices.mtp_blocked == "memory":
            why = "a module (a block and an output head per token) would not fit in memory."
        elif choices.mtp_blocked == "data":
            why = (
                f"a module adds a block's parameters, more than the data (about {answers.dataset_tokens / 1e6:.1f}M "
                "tokens) can train without memorising."
            )
        else:
            why = (
                f"with it a step takes {mtp_cost} longer and the budget would afford "
                f"{choices.mtp_affordable_steps:,} steps, fewer than the {choices.wanted_steps:,} the data asks "
                "for: when the budget is the limit, plain next-token steps are worth more."
            )
        r["model.mtp_depth"] = f"No multi-token prediction: {why}"
    # -- routing ---------------------------------------------------------------------------------------------
    if moe.n_group == 1:
        r["model.moe.n_group"] = (
            "One group: on one device every expert is local, so there is no traffic between devices for "
            "group-limited routing to bound (it would only narrow the router's choice)."
            if answers.num_gpus == 1
            else "One group: the experts do not split evenly over the GPUs."
        )
        r["model.moe.topk_group"] = "1, as n_group: no limit."
    else:
        per_group = moe.num_routed_experts // moe.n_group
        r["model.moe.n_group"] = (
            f"{moe.n_group} groups of {per_group} experts, one per GPU: with the experts spread over the GPUs "
            "(expert parallelism) a group is a device, as DeepSeek-V3's groups are nodes."
        )
        r["model.moe.topk_group"] = (
            f"Each token chooses its {moe.top_k} experts within its {moe.topk_group} best groups (a group scores "
            f"as its two best experts' sum, as in DeepSeek-V3): it reaches at most {moe.topk_group} of "
            f"{moe.n_group} GPUs, which bounds the all-to-all traffic (DeepSeek-V3: 4 of 8 nodes)."
        )
    r["model.moe.routed_scaling_factor"] = (
        f"1: the sigmoid weights of the top-{moe.top_k} experts are renormalised to sum to 1, so the routed output "
        "is their weighted mean, on the scale of one expert's; DeepSeek-V3 scales by 2.5 for its 8 of 256 experts."
    )
    # -- optimizer and schedule ------------------------------------------------------------------------------
    o = t.optimizer
    state = human_bytes(optimizer_state_elements(spec) * 4)
    adamw_state = human_bytes(optimizer_state_elements(_changed(spec, training={"optimizer": {"name": "adamw"}})) * 4)
    muon_extra = _more(choices.muon_step_seconds, choices.adamw_step_seconds)
    if o.name == "adafactor":
        r["training.optimizer.name"] = (
            f"Adafactor: memory is tight (gradient checkpointing is on), and its factored second moments hold "
            f"{state} of optimizer state where AdamW would hold {adamw_state}."
        )
        r["training.optimizer.lr"] = (
            f"{o.lr:g}: Adafactor's relative step: an update moves a weight by about {o.lr:.0%} of its RMS "
            "(torch caps it at 1/√step early on), so AdamW's table of rates does not apply."
        )
        r["training.optimizer.weight_decay"] = "Weight decay 0.01 on the matrices: mild regularisation."
        r.pop("training.optimizer.betas", None)
    elif o.name == "muon":
        r["training.optimizer.name"] = (
            f"Muon for the hidden and expert matrices (their updates orthogonalised by Newton-Schulz iterations), "
            f"AdamW for embeddings, head, norms and router, as Moonlight trains: about twice AdamW's compute "
            f"efficiency at scale. Here its iterations make a step {muon_extra} longer (estimated; the wizard "
            f"accepts up to +{MUON_MAX_EXTRA:.0%}), and its state is {state} where AdamW's would be {adamw_state}."
        )
        r["training.optimizer.lr"] += (
            " Muon's update is scaled to AdamW's size (adjust_lr match_rms_adamw), so AdamW's rate carries over."
        )
        r["training.optimizer.adamw_lr"] = "The same peak rate for the AdamW part (embeddings, head, norms, router)."
        r["training.optimizer.weight_decay"] = "Decoupled weight decay 0.01 on Muon's matrices: mild regularisation."
        r["training.optimizer.adamw_betas"] = r.pop("training.optimizer.betas", "")
    else:
        if answers.priority == "speed":
            why_not = f"Muon would make each step {muon_extra} longer (estimated), and you asked for speed"
        elif answers.hardware_profile.kind == "cpu":
            why_not = (
                "On a CPU, Muon's Newton-Schulz iterations on small matrices cost more than estimated: on the tiny "
                "demo template a step took 28% longer, and for the same training time it ended with a higher "
                "validation loss than AdamW (make bench, same_wall_time)"
            )
        else:
            why_not = (
                f"Muon would make each step {muon_extra} longer here (estimated; its Newton-Schulz matmuls are a "
                f"large share of a small model's or small batch's step), more than the +{MUON_MAX_EXTRA:.0%} it "
                "is worth"
            )
        r["training.optimizer.name"] = (
            f"AdamW (fused): the well-tried default. {why_not}; Adafactor saves optimizer memory ({adamw_state} "
            "here), which is not short; SGD trains transformers markedly worse."
        )
    warmup_for = {"adamw": "AdamW's", "muon": "Muon's momentum and AdamW's", "adafactor": "Adafactor's"}[o.name]
    r["training.schedule.warmup_steps"] = (
        f"{t.schedule.warmup_steps} warmup steps (~5% of the run, at most 2000): {warmup_for} statistics settle first."
    )
    if t.schedule.kind == "wsd":
        r["training.schedule.kind"] = (
            f"Warmup-stable-decay: the rate stays at its peak until the last {t.schedule.decay_fraction:.0%} of "
            "the run, then falls linearly to 10%. You may continue training: a checkpoint from the stable phase "
            "goes on at the peak rate with more steps or data and decays later, which cosine (its decay tied to "
            "max_steps) does not allow; the final loss is on a par with cosine's (MiniCPM)."
        )
        r["training.schedule.decay_fraction"] = (
            f"The last {t.schedule.decay_fraction:.0%} of the steps decay: enough to reach cosine's final loss."
        )
    else:
        r["training.schedule.kind"] = (
            "Cosine decay to 10% of the peak: a better final loss than a constant rate, for a run of fixed length "
            "(warmup-stable-decay is proposed when you may continue training)."
        )


def _step_without_mtp(choices: Choices, optimizer: str) -> float:
    return choices.muon_step_seconds if optimizer == "muon" else choices.adamw_step_seconds


def estimate_proposal(proposal: Proposal, *, calibration: float = 1.0) -> Estimate:
    """The estimate the wizard shows next to a proposal (on the answers' hardware and GPU count)."""
    return estimate(
        proposal.spec,
        proposal.hardware,
        num_gpus=proposal.answers.num_gpus,
        calibration=calibration,
        dataset_tokens=proposal.answers.dataset_tokens,
    )
