"""Advice on a spec: MoE mistakes and the rules of thumb people rely on, each with its reason and the fix.

Pure Python (the web tier calls it on every keystroke of the editor). ``lint(spec, ...)`` returns ``Advice``
items: ``path`` names the field to change, ``message`` says what is wrong and why, ``fix`` says what to set,
and ``patch`` (when one value fixes it) maps dotted paths to the suggested values so a page can apply it.

Each rule of thumb is a small function registered with ``@rule(codes...)`` (as Django's system checks are):
it looks at a ``LintContext`` (the spec and what the caller knows of the hardware and the data) and yields the
``Advice`` it has, with the codes it declared. ``lint`` runs every rule in ``RULES``, in the order they are
defined here, then puts warnings first; a new rule is one more function below.

A spec that breaks a cross-field rule of ``workers.engine.spec`` cannot be validated, yet people still need
advice on it: ``lint_raw(raw)`` builds the spec from its separately validated sections (skipping only the
cross-field rules) and lints that. The validation error still blocks saving; the advice says what to choose.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal

from pydantic import ValidationError

from workers.engine.estimate import parameter_breakdown
from workers.engine.hardware import HardwareProfile
from workers.engine.hf_families import NotExpressible, hf_family
from workers.engine.spec import AdamWSpec, DataSpec, ModelSpec, MuonSpec, SGDSpec, Spec, TrainingSpec, migrate

Severity = Literal["warning", "info"]

# Tokens of data per parameter below which a model memorises its data rather than generalising: "far too
# few" (Chinchilla's compute-optimal figure is ~20; nanoGPT's 10M-parameter model on 1M characters of
# Shakespeare, 0.1 per parameter, overfits within minutes).
OVERFIT_TOKENS_PER_PARAMETER = 0.5
# More passes than this over the same data and validation loss usually turns up (Muennighoff et al. 2023:
# repeated data is nearly as good as new for ~4 epochs, then its value falls off quickly).
MAX_USEFUL_EPOCHS = 16.0

# Peak learning rates that worked for AdamW-trained transformers by non-embedding size (GPT-3 paper,
# table 2.1; Chinchilla and Pythia sit on the same curve): (parameters, learning rate).
_LR_BY_SIZE = (
    (1.25e8, 6e-4),
    (3.5e8, 3e-4),
    (7.6e8, 2.5e-4),
    (1.3e9, 2e-4),
    (2.7e9, 1.6e-4),
    (6.7e9, 1.2e-4),
    (1.3e10, 1e-4),
    (1.75e11, 6e-5),
)
# Small models tolerate larger rates, but 1e-2 is about the edge of stable AdamW training at any size.
_LR_SMALL_MODEL_CAP = 3e-3


@dataclass(frozen=True)
class Advice:
    code: str
    severity: Severity
    path: str
    message: str
    fix: str
    patch: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def typical_learning_rate(non_embedding_parameters: int) -> float:
    """The peak AdamW learning rate that models of this size were trained with (log-linear between the
    table's sizes; capped for small models)."""
    n = max(1, non_embedding_parameters)
    if n <= _LR_BY_SIZE[0][0]:
        # Below 125M the GPT-3 trend continues upward; cap it where small models stay stable.
        slope = math.log(_LR_BY_SIZE[1][1] / _LR_BY_SIZE[0][1]) / math.log(_LR_BY_SIZE[1][0] / _LR_BY_SIZE[0][0])
        return min(_LR_SMALL_MODEL_CAP, _LR_BY_SIZE[0][1] * (n / _LR_BY_SIZE[0][0]) ** slope)
    for (n0, lr0), (n1, lr1) in itertools.pairwise(_LR_BY_SIZE):
        if n <= n1:
            frac = math.log(n / n0) / math.log(n1 / n0)
            return math.exp(math.log(lr0) + frac * (math.log(lr1) - math.log(lr0)))
    return _LR_BY_SIZE[-1][1]


def _head_choices(hidden: int, current: int) -> list[int]:
    """Head counts that divide ``hidden`` with a head dimension that is even and a multiple of 8, nearest to
    ``current`` first."""
    good = [h for h in range(1, min(hidden, 256) + 1) if hidden % h == 0 and (hidden // h) % 8 == 0]
    return sorted(good, key=lambda h: (abs(h - current), h))[:3]


def _heads_phrase(hidden: int, choices: list[int]) -> str:
    """``"4 heads (head dimension 32), or 2 (64)"``: the counts to choose from with what each gives."""
    first, *rest = choices
    text = f"{first} heads (head dimension {hidden // first})"
    return text + "".join(f", or {h} ({hidden // h})" for h in rest)


def _round_up(value: int, multiple: int) -> int:
    return ((value + multiple - 1) // multiple) * multiple


@dataclass
class LintContext:
    """What a rule looks at: the spec, and what the caller knows of where and on what it will train.

    ``hardware``/``num_gpus`` are for the device rules (no hardware: those rules say nothing) and
    ``dataset_tokens`` (tokens in the training data; None when unknown) for the data-budget rules.
    """

    spec: Spec
    hardware: HardwareProfile | None = None
    num_gpus: int = 1
    dataset_tokens: int | None = None

    @property
    def model(self) -> ModelSpec:
        return self.spec.model

    @property
    def training(self) -> TrainingSpec:
        return self.spec.training

    @property
    def data(self) -> DataSpec:
        return self.spec.data

    @cached_property
    def breakdown(self) -> dict[str, int] | None:
        """``parameter_breakdown(spec)``, computed once for every rule; None when ``top_k`` exceeds the number
        of routed experts, where parameter counts mean nothing (``top_k_above_experts`` says so)."""
        moe = self.spec.model.moe
        return parameter_breakdown(self.spec) if moe.top_k <= moe.num_routed_experts else None

    @property
    def data_budget(self) -> tuple[int, int] | None:
        """``(dataset_tokens, total parameters)`` for the data-budget rules; None when either is unknown (no or
        empty data, or no parameter count)."""
        if self.dataset_tokens is None or self.dataset_tokens <= 0 or self.breakdown is None:
            return None
        return self.dataset_tokens, self.breakdown["total"]


RuleCheck = Callable[[LintContext], Iterable[Advice]]


@dataclass(frozen=True)
class Rule:
    """One registered rule: ``name`` (its function's name without ``rule_``) and the advice ``codes`` it gives."""

    name: str
    codes: tuple[str, ...]
    check: RuleCheck


RULES: list[Rule] = []  # in the order of definition: the order of lint()'s advice within a severity


def rule(*codes: str) -> Callable[[RuleCheck], RuleCheck]:
    """Register the decorated ``rule_<name>(ctx)`` as a lint rule that may give advice with ``codes``."""

    def register(check: RuleCheck) -> RuleCheck:
        RULES.append(Rule(check.__name__.removeprefix("rule_"), codes, check))
        return check

    return register


def lint(
    spec: Spec,
    *,
    hardware: HardwareProfile | None = None,
    num_gpus: int = 1,
    dataset_tokens: int | None = None,
) -> list[Advice]:
    """All advice for ``spec`` (warnings first). ``hardware``/``num_gpus`` enable the device checks and
    ``dataset_tokens`` (tokens in the training data) the data-budget checks."""
    ctx = LintContext(spec, hardware, num_gpus, dataset_tokens)
    out = [advice for registered in RULES for advice in registered.check(ctx)]
    out.sort(key=lambda a: 0 if a.severity == "warning" else 1)  # stable: rule order within a severity
    return out


# -- shape -------------------------------------------------------------------------------------------------


@rule("heads_divide_hidden", "head_dim_multiple_of_8", "head_dim_small")
def rule_head_shape(ctx: LintContext) -> Iterator[Advice]:
    m = ctx.model
    choices = _head_choices(m.hidden_size, m.num_heads)
    if m.hidden_size % m.num_heads:
        yield Advice(
            "heads_divide_hidden",
            "warning",
            "model.num_heads",
            f"{m.num_heads} heads do not divide the hidden size {m.hidden_size}: every head must get the same "
            "slice of the residual stream.",
            f"Use {_heads_phrase(m.hidden_size, choices)}"
            if choices
            else f"Use a hidden size that is a multiple of 64, e.g. {_round_up(m.hidden_size, 64)}, "
            f"with {max(1, _round_up(m.hidden_size, 64) // 64)} heads of 64.",
            {"model.num_heads": choices[0]}
            if choices
            else {
                "model.hidden_size": _round_up(m.hidden_size, 64),
                "model.num_heads": max(1, _round_up(m.hidden_size, 64) // 64),
            },
        )
    elif m.head_dim % 8:
        yield Advice(
            "head_dim_multiple_of_8",
            "warning",
            "model.num_heads",
            f"The head dimension is {m.head_dim} ({m.hidden_size} / {m.num_heads}), not a multiple of 8: "
            "attention kernels and tensor cores work on blocks of 8 (16 bytes in half precision) and fall back "
            "to slower paths.",
            f"Use {_heads_phrase(m.hidden_size, choices)}" if choices else "Use a hidden size divisible by 8.",
            {"model.num_heads": choices[0]} if choices else {},
        )
    elif m.head_dim < 32 and m.hidden_size >= 256:
        yield Advice(
            "head_dim_small",
            "info",
            "model.num_heads",
            f"Heads of dimension {m.head_dim} are small: below 32 each head's attention pattern gets noisy, and "
            "attention time grows with the number of heads.",
            "Use fewer, wider heads (64 or 128 dimensions is usual).",
            {"model.num_heads": max(1, m.hidden_size // 64)} if m.hidden_size % 64 == 0 else {},
        )


@rule("kv_heads_divide_heads")
def rule_kv_heads_divide_heads(ctx: LintContext) -> Iterator[Advice]:
    m = ctx.model
    if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
        divisors = [h for h in range(1, m.num_heads + 1) if m.num_heads % h == 0]
        nearest = min(divisors, key=lambda h: abs(h - m.num_kv_heads))  # type: ignore[operator]
        yield Advice(
            "kv_heads_divide_heads",
            "warning",
            "model.num_kv_heads",
            f"{m.num_kv_heads} key/value heads do not divide {m.num_heads} query heads: grouped-query "
            "attention shares each key/value head among the same number of query heads.",
            f"Use {nearest} key/value heads (a divisor of num_heads), or null for one per query head.",
            {"model.num_kv_heads": nearest},
        )


@rule("gqa_is_mha")
def rule_gqa_is_mha(ctx: LintContext) -> Iterator[Advice]:
    m = ctx.model
    if m.attention == "gqa" and m.num_kv_heads == m.num_heads:
        yield Advice(
            "gqa_is_mha",
            "info",
            "model.num_kv_heads",
            f"Grouped-query attention with {m.num_kv_heads} key/value heads for {m.num_heads} query heads is "
            "plain multi-head attention: no group shares a key/value head, so the KV cache is not smaller.",
            f"Use fewer key/value heads (e.g. {max(1, m.num_heads // 4)}: a quarter of the cache), or attention mha.",
            {"model.num_kv_heads": max(1, m.num_heads // 4)},
        )


@rule("mla_cache_not_smaller")
def rule_mla_cache_not_smaller(ctx: LintContext) -> Iterator[Advice]:
    m = ctx.model
    if m.attention != "mla":
        return
    latent = m.mla.kv_lora_rank + m.mla.qk_rope_head_dim
    mha = 2 * m.num_heads * m.head_dim
    if latent >= mha:
        suggested = max(1, min(4 * m.mla.qk_rope_head_dim, mha // 2))
        yield Advice(
            "mla_cache_not_smaller",
            "info",
            "model.mla.kv_lora_rank",
            f"The latent (kv_lora_rank {m.mla.kv_lora_rank} + rotary key {m.mla.qk_rope_head_dim} = {latent} numbers "
            f"per token and layer) is no smaller than multi-head attention's keys and values ({mha}): latent "
            "attention then costs extra projections and saves no cache.",
            f"Use a kv_lora_rank of about {suggested} (DeepSeek-V2: 4 × the rotary key width, a cache ~1/14 of "
            "multi-head attention's).",
            {"model.mla.kv_lora_rank": suggested},
        )


@rule("mtp_weight_zero", "mtp_deep")
def rule_multi_token_prediction(ctx: LintContext) -> Iterator[Advice]:
    m, t = ctx.model, ctx.training
    if m.mtp_depth and t.mtp_loss_weight == 0:
        yield Advice(
            "mtp_weight_zero",
            "warning",
            "training.mtp_loss_weight",
            f"{m.mtp_depth} multi-token prediction module(s) with a loss weight of 0: they cost a block and an "
            "output head per token in every step and teach the model nothing.",
            "Set mtp_loss_weight to 0.3 (DeepSeek-V3), or mtp_depth to 0.",
            {"training.mtp_loss_weight": 0.3},
        )
    elif m.mtp_depth > 1:
        yield Advice(
            "mtp_deep",
            "info",
            "model.mtp_depth",
            f"Multi-token prediction {m.mtp_depth} tokens ahead: each module costs another block and output head "
            "per token, and the further ahead the prediction the less it helps the next-token loss "
            "(DeepSeek-V3 predicts one extra token).",
            "Use mtp_depth 1.",
            {"model.mtp_depth": 1},
        )


@rule("hidden_multiple_of_64")
def rule_hidden_multiple_of_64(ctx: LintContext) -> Iterator[Advice]:
    m = ctx.model
    if m.hidden_size % 64 and m.hidden_size >= 256:
        yield Advice(
            "hidden_multiple_of_64",
            "info",
            "model.hidden_size",
            f"Hidden size {m.hidden_size} is not a multiple of 64: matrix kernels tile by 64 and waste the rest.",
            f"Use {_round_up(m.hidden_size, 64)}.",
            {"model.hidden_size": _round_up(m.hidden_size, 64)},
        )


@rule("vocab_multiple_of_64")
def rule_vocab_multiple_of_64(ctx: LintContext) -> Iterator[Advice]:
    m = ctx.model
    if m.task == "causal_lm" and m.vocab_size % 64 and m.vocab_size > 4096:
        padded = _round_up(m.vocab_size, 64)
        yield Advice(
            "vocab_multiple_of_64",
            "info",
            "model.vocab_size",
            f"A vocabulary of {m.vocab_size} is not a multiple of 64: the output projection, the largest matmul "
            "of a small model, runs on ragged tiles (GPT-2's 50257 → 50304 was worth ~25% speed in nanoGPT).",
            f"Pad it to {padded}; the extra ids are simply never produced by the tokenizer.",
            {"model.vocab_size": padded},
        )


@rule("prefer_swiglu")
def rule_prefer_swiglu(ctx: LintContext) -> Iterator[Advice]:
    m = ctx.model
    if m.activation != "swiglu":
        yield Advice(
            "prefer_swiglu",
            "info",
            "model.activation",
            f"{m.activation.upper()} feed-forwards train to a worse loss than SwiGLU at the same compute "
            "(Shazeer 2020; used by LLaMA and DeepSeek).",
            "Use swiglu (the expert width stays the same; SwiGLU adds a gate projection).",
            {"model.activation": "swiglu"},
        )


# -- mixture of experts ------------------------------------------------------------------------------------


@rule("top_k_above_experts")
def rule_top_k_above_experts(ctx: LintContext) -> Iterator[Advice]:
    E, k = ctx.model.moe.num_routed_experts, ctx.model.moe.top_k
    if k > E:
        yield Advice(
            "top_k_above_experts",
            "warning",
            "model.moe.top_k",
            f"top_k ({k}) is larger than the number of routed experts ({E}): a token cannot go to more experts "
            "than exist.",
            f"Set top_k to at most {E} (2 is usual for 8 experts, 6-8 for 64).",
            {"model.moe.top_k": min(E, 2)},
        )


@rule("balancing_off")
def rule_balancing_off(ctx: LintContext) -> Iterator[Advice]:
    moe = ctx.model.moe
    E = moe.num_routed_experts
    if moe.balancing == "none" and E >= 8:
        yield Advice(
            "balancing_off",
            "warning",
            "model.moe.balancing",
            f"Load balancing is off with {E} experts: routers collapse onto a few experts early in training, "
            "the others stop learning and the model behaves like a much smaller one.",
            "Use aux_free (DeepSeek-V3's bias update: balances without a loss term) or aux_loss.",
            {"model.moe.balancing": "aux_free"},
        )


@rule("not_exportable")
def rule_not_exportable(ctx: LintContext) -> Iterator[Advice]:
    """A language model that no transformers family expresses gets no Hugging Face export with its report. Said
    once, at the field that prevents it; the fix is given where one field makes the difference (softmax scoring
    with the aux-free bias: DeepSeek-V3 pairs that bias with sigmoid scores)."""
    if ctx.model.task != "causal_lm":
        return  # transformers' MoE families are causal LMs only: nothing for a classifier to change
    try:
        hf_family(ctx.model)
    except NotExpressible as refused:
        moe = ctx.model.moe
        scoring_fix = refused.field == "model.moe.balancing" and moe.scoring == "softmax"
        yield Advice(
            "not_exportable",
            "info",
            refused.field,
            f"Its report will have no Hugging Face export (no transformers family computes this model): "
            f"{refused.message}.",
            "Use sigmoid scoring (DeepSeek-V3's router, with the same aux-free bias): the export then loads as "
            "GLM-4-MoE, or DeepSeek-V3 with latent attention."
            if scoring_fix
            else "Change the field named, if a model that transformers loads matters more.",
            {"model.moe.scoring": "sigmoid"} if scoring_fix else {},
        )


@rule("aux_loss_zero")
def rule_aux_loss_zero(ctx: LintContext) -> Iterator[Advice]:
    moe = ctx.model.moe
    if moe.balancing == "aux_loss" and moe.aux_loss_coef == 0:
        yield Advice(
            "aux_loss_zero",
            "warning",
            "model.moe.aux_loss_coef",
            "Balancing is aux_loss but its coefficient is 0: nothing balances the experts.",
            "Set aux_loss_coef to 0.001-0.01, or use aux_free.",
            {"model.moe.aux_loss_coef": 0.01},
        )


@rule("aux_loss_high")
def rule_aux_loss_high(ctx: LintContext) -> Iterator[Advice]:
    moe = ctx.model.moe
    if moe.balancing == "aux_loss" and moe.aux_loss_coef > 0.05:
        yield Advice(
            "aux_loss_high",
            "warning",
            "model.moe.aux_loss_coef",
            f"An auxiliary loss coefficient of {moe.aux_loss_coef} makes balance compete with the language loss "
            "and hurts quality (Switch uses 0.01, DeepSeek 0.001-0.003).",
            "Lower it to 0.01, or switch to aux_free balancing.",
            {"model.moe.aux_loss_coef": 0.01},
        )


@rule("aux_free_frozen")
def rule_aux_free_frozen(ctx: LintContext) -> Iterator[Advice]:
    moe = ctx.model.moe
    if moe.balancing == "aux_free" and moe.bias_update_speed == 0:
        yield Advice(
            "aux_free_frozen",
            "warning",
            "model.moe.bias_update_speed",
            "aux_free balancing with a bias update speed of 0 never moves the bias: nothing balances.",
            "Set bias_update_speed to 0.001 (DeepSeek-V3).",
            {"model.moe.bias_update_speed": 0.001},
        )


@rule("top_k_all_experts")
def rule_top_k_all_experts(ctx: LintContext) -> Iterator[Advice]:
    E, k = ctx.model.moe.num_routed_experts, ctx.model.moe.top_k
    if E > 1 and k == E:
        yield Advice(
            "top_k_all_experts",
            "info",
            "model.moe.top_k",
            f"Every token goes to all {E} experts: this is a dense model with a router's overhead.",
            "Use a top_k well below the number of experts (e.g. 2 of 8), or a dense feed-forward.",
            {"model.moe.top_k": max(1, E // 4)},
        )


@rule("groups_divide_experts", "topk_group_above_groups", "too_few_eligible_experts", "groups_on_one_device")
def rule_group_limited_routing(ctx: LintContext) -> Iterator[Advice]:
    moe = ctx.model.moe
    E, G, g, k = moe.num_routed_experts, moe.n_group, moe.topk_group, moe.top_k
    if G == 1 and g == 1:
        return
    if E % G:
        divisors = [d for d in range(1, E + 1) if E % d == 0]
        nearest = min(divisors, key=lambda d: (abs(d - G), d))
        yield Advice(
            "groups_divide_experts",
            "warning",
            "model.moe.n_group",
            f"{E} routed experts cannot be split into {G} equal groups: group-limited routing compares groups "
            "of the same size (one per device or node).",
            f"Use {nearest} groups (a divisor of num_routed_experts).",
            {"model.moe.n_group": nearest},
        )
        return
    if g > G:
        yield Advice(
            "topk_group_above_groups",
            "warning",
            "model.moe.topk_group",
            f"topk_group ({g}) is more than the {G} groups there are.",
            f"Use at most {G} (DeepSeek-V3: 4 of 8 groups).",
            {"model.moe.topk_group": max(1, G // 2)},
        )
        return
    eligible = g * (E // G)
    if eligible < k <= E:
        needed = math.ceil(k / (E // G))
        yield Advice(
            "too_few_eligible_experts",
            "warning",
            "model.moe.topk_group",
            f"Only {eligible} experts are eligible ({g} of {G} groups of {E // G}) but each token needs {k}.",
            f"Raise topk_group to {needed}.",
            {"model.moe.topk_group": needed},
        )
        return
    if ctx.num_gpus == 1 and g < G:
        yield Advice(
            "groups_on_one_device",
            "info",
            "model.moe.n_group",
            f"Group-limited routing ({g} of {G} groups per token) exists to bound how many devices or nodes a "
            "token's experts live on, and so the all-to-all traffic (DeepSeek-V3: 8 groups, one per node, 4 per "
            "token); on one device it only narrows the router's choice.",
            "Use n_group 1 and topk_group 1 unless the experts will be spread over devices.",
            {"model.moe.n_group": 1, "model.moe.topk_group": 1},
        )


@rule("capacity_below_one")
def rule_capacity_below_one(ctx: LintContext) -> Iterator[Advice]:
    moe = ctx.model.moe
    if moe.capacity_factor is not None and moe.capacity_factor < 1.0:
        yield Advice(
            "capacity_below_one",
            "warning",
            "model.moe.capacity_factor",
            f"A capacity factor of {moe.capacity_factor} drops tokens even when routing is perfectly balanced.",
            "Use 1.25-2.0, or null for no dropping.",
            {"model.moe.capacity_factor": 1.25},
        )


@rule("few_tokens_per_expert")
def rule_few_tokens_per_expert(ctx: LintContext) -> Iterator[Advice]:
    m, t = ctx.model, ctx.training
    E, k = m.moe.num_routed_experts, m.moe.top_k
    if E > 1 and m.num_moe_layers > 0:
        tokens_per_expert = t.batch_size * ctx.data.seq_len * k / E
        if tokens_per_expert < 16:
            yield Advice(
                "few_tokens_per_expert",
                "info",
                "training.batch_size",
                f"Each expert sees about {tokens_per_expert:.1f} tokens per micro-batch: expert matmuls are tiny "
                "and load statistics noisy.",
                "Use a larger micro-batch or fewer experts.",
            )


@rule("experts_not_divisible")
def rule_experts_not_divisible(ctx: LintContext) -> Iterator[Advice]:
    E, num_gpus = ctx.model.moe.num_routed_experts, ctx.num_gpus
    if num_gpus > 1 and E % num_gpus:
        nearest = max(num_gpus, round(E / num_gpus) * num_gpus)
        yield Advice(
            "experts_not_divisible",
            "warning",
            "model.moe.num_routed_experts",
            f"{E} routed experts cannot be spread evenly over {num_gpus} GPUs: with expert parallelism some GPUs "
            "hold an extra expert and become the bottleneck of every step.",
            f"Use a multiple of {num_gpus} experts, e.g. {nearest}.",
            {"model.moe.num_routed_experts": nearest},
        )


@rule("no_moe_layers")
def rule_no_moe_layers(ctx: LintContext) -> Iterator[Advice]:
    m = ctx.model
    if m.num_moe_layers == 0:
        yield Advice(
            "no_moe_layers",
            "info",
            "model.moe.first_dense_layers",
            "Every layer is dense (first_dense_layers = num_layers): the experts are never used.",
            "Lower first_dense_layers (DeepSeek keeps 1-3 dense layers at the bottom).",
            {"model.moe.first_dense_layers": min(1, m.num_layers - 1)},
        )


# -- optimisation ------------------------------------------------------------------------------------------


@rule("lr_high_for_size")
def rule_lr_high_for_size(ctx: LintContext) -> Iterator[Advice]:
    o = ctx.training.optimizer
    b, lr = ctx.breakdown, o.lr
    # The table is of AdamW rates; Muon's match_rms_adamw scale makes its rate mean the same. Adafactor's is
    # relative to each parameter's scale and SGD's has no common scale: the table says nothing about them.
    adamw_scaled = isinstance(o, AdamWSpec) or (isinstance(o, MuonSpec) and o.adjust_lr == "match_rms_adamw")
    if b is not None and adamw_scaled:
        non_embedding = b["active"] - b["embedding"]
        typical = typical_learning_rate(non_embedding)
        if lr > 2.5 * typical:
            yield Advice(
                "lr_high_for_size",
                "warning",
                "training.optimizer.lr",
                f"A peak learning rate of {lr:g} is high for {non_embedding / 1e6:.1f}M active "
                f"non-embedding parameters: models of this size train at about {typical:.1e}; much higher "
                "and loss spikes or diverges.",
                f"Use about {typical:.1e}.",
                {"training.optimizer.lr": float(f"{typical:.1e}")},
            )


@rule("no_warmup", "warmup_long")
def rule_warmup_length(ctx: LintContext) -> Iterator[Advice]:
    t = ctx.training
    warmup = t.schedule.warmup_steps
    if warmup == 0:
        suggested = max(1, min(2000, t.max_steps // 20))
        yield Advice(
            "no_warmup",
            "warning",
            "training.schedule.warmup_steps",
            "No warmup: AdamW's second-moment estimates are unreliable in the first steps, and a full learning "
            "rate then can blow up the loss (and the router) at the start.",
            f"Warm up for {suggested} steps (about 5% of the run, 1-2k at most).",
            {"training.schedule.warmup_steps": suggested},
        )
    elif warmup > 0.3 * t.max_steps and t.max_steps >= 20:
        suggested = max(1, t.max_steps // 20)
        yield Advice(
            "warmup_long",
            "info",
            "training.schedule.warmup_steps",
            f"Warmup takes {warmup / t.max_steps:.0%} of the run: most steps happen before the peak rate.",
            f"Use about {suggested} steps (5%).",
            {"training.schedule.warmup_steps": suggested},
        )


@rule("no_decay")
def rule_no_decay(ctx: LintContext) -> Iterator[Advice]:
    t = ctx.training
    if t.schedule.kind == "constant" and t.max_steps >= 1000:
        yield Advice(
            "no_decay",
            "info",
            "training.schedule.kind",
            "A constant learning rate leaves loss on the table: decaying to ~10% at the end is worth a clear "
            "improvement for the same steps.",
            "Use cosine (with min_lr_ratio 0.1).",
            {"training.schedule.kind": "cosine"},
        )


@rule("no_grad_clip")
def rule_no_grad_clip(ctx: LintContext) -> Iterator[Advice]:
    if ctx.training.grad_clip is None:
        yield Advice(
            "no_grad_clip",
            "warning",
            "training.grad_clip",
            "Gradients are not clipped: MoE routers produce occasional gradient spikes that clipping absorbs.",
            "Clip the global norm at 1.0.",
            {"training.grad_clip": 1.0},
        )


@rule("no_weight_decay")
def rule_no_weight_decay(ctx: LintContext) -> Iterator[Advice]:
    o = ctx.training.optimizer
    if isinstance(o, AdamWSpec | MuonSpec) and o.weight_decay == 0:
        yield Advice(
            "no_weight_decay",
            "info",
            "training.optimizer.weight_decay",
            f"No weight decay: {'AdamW' if isinstance(o, AdamWSpec) else 'Muon'}'s decoupled decay regularises "
            "and keeps weights from growing (Moonlight found it necessary for Muon at scale).",
            "Use 0.01-0.1.",
            {"training.optimizer.weight_decay": 0.01 if isinstance(o, AdamWSpec) else 0.1},
        )


@rule("beta2_high")
def rule_beta2_high(ctx: LintContext) -> Iterator[Advice]:
    o = ctx.training.optimizer
    if isinstance(o, AdamWSpec):
        path, betas = "training.optimizer.betas", o.betas
    elif isinstance(o, MuonSpec):
        path, betas = "training.optimizer.adamw_betas", o.adamw_betas
    else:
        return
    if betas[1] > 0.999 and ctx.model.num_moe_layers:
        yield Advice(
            "beta2_high",
            "info",
            path,
            f"beta2 = {betas[1]} adapts slowly to the gradient spikes MoE routing causes.",
            "Use 0.95 (LLaMA, DeepSeek).",
            {path: [betas[0], 0.95]},
        )


@rule("sgd_for_transformer")
def rule_sgd_for_transformer(ctx: LintContext) -> Iterator[Advice]:
    if isinstance(ctx.training.optimizer, SGDSpec):
        yield Advice(
            "sgd_for_transformer",
            "info",
            "training.optimizer.name",
            "SGD trains transformers markedly worse than adaptive optimizers: the gradients of embeddings, "
            "attention and routers differ by orders of magnitude, and one learning rate cannot suit them all.",
            "Use adamw, or muon for the hidden matrices.",
            {"training.optimizer": {"name": "adamw"}},
        )


@rule("muon_original_lr_low")
def rule_muon_original_lr_low(ctx: LintContext) -> Iterator[Advice]:
    o = ctx.training.optimizer
    if isinstance(o, MuonSpec) and o.adjust_lr == "original" and o.lr < 2e-3:
        yield Advice(
            "muon_original_lr_low",
            "warning",
            "training.optimizer.lr",
            f"With the original scale Muon's orthogonalised update has unit spectral norm, and learning rates "
            f"around 0.02 work (Keller Jordan); {o.lr:g} is an AdamW-sized rate and barely moves the matrices.",
            "Use lr 0.02, or adjust_lr match_rms_adamw to keep an AdamW-sized rate (Moonlight).",
            {"training.optimizer.lr": 0.02},
        )


@rule("classification_smoothing")
def rule_classification_smoothing(ctx: LintContext) -> Iterator[Advice]:
    t = ctx.training
    if ctx.model.task == "classification" and t.label_smoothing == 0 and t.loss == "cross_entropy":
        yield Advice(
            "classification_smoothing",
            "info",
            "training.label_smoothing",
            "Classifiers trained with hard labels become over-confident; label smoothing improves calibration.",
            "Use label_smoothing 0.1.",
            {"training.label_smoothing": 0.1},
        )


@rule("lm_smoothing")
def rule_lm_smoothing(ctx: LintContext) -> Iterator[Advice]:
    if ctx.model.task == "causal_lm" and ctx.training.label_smoothing > 0:
        yield Advice(
            "lm_smoothing",
            "info",
            "training.label_smoothing",
            "Label smoothing on next-token prediction inflates perplexity without a quality gain.",
            "Use 0 for generation.",
            {"training.label_smoothing": 0.0},
        )


@rule("never_evaluates")
def rule_never_evaluates(ctx: LintContext) -> Iterator[Advice]:
    t = ctx.training
    if t.eval_interval > t.max_steps:
        yield Advice(
            "never_evaluates",
            "warning",
            "training.eval_interval",
            f"eval_interval ({t.eval_interval}) is beyond max_steps ({t.max_steps}): the run never measures "
            "validation loss, so plateaus, overfitting and early stopping go unseen.",
            f"Evaluate every {max(1, t.max_steps // 10)} steps.",
            {"training.eval_interval": max(1, t.max_steps // 10)},
        )


@rule("never_checkpoints")
def rule_never_checkpoints(ctx: LintContext) -> Iterator[Advice]:
    t = ctx.training
    if t.checkpoint_interval > t.max_steps:
        yield Advice(
            "never_checkpoints",
            "info",
            "training.checkpoint_interval",
            "No checkpoint is written before the end: an interrupted run restarts from scratch.",
            f"Checkpoint every {max(1, t.max_steps // 5)} steps.",
            {"training.checkpoint_interval": max(1, t.max_steps // 5)},
        )


@rule("seq_len_above_max")
def rule_seq_len_above_max(ctx: LintContext) -> Iterator[Advice]:
    seq_len, max_seq_len = ctx.data.seq_len, ctx.model.max_seq_len
    if seq_len > max_seq_len:
        yield Advice(
            "seq_len_above_max",
            "warning",
            "data.seq_len",
            f"Training sequences of {seq_len} tokens exceed the {max_seq_len} positions the model encodes.",
            f"Raise model.max_seq_len to {seq_len} or shorten data.seq_len.",
            {"model.max_seq_len": seq_len},
        )


@rule("warmup_beyond_run")
def rule_warmup_beyond_run(ctx: LintContext) -> Iterator[Advice]:
    t = ctx.training
    if t.schedule.warmup_steps > t.max_steps:
        yield Advice(
            "warmup_beyond_run",
            "warning",
            "training.schedule.warmup_steps",
            "Warmup is longer than the run: the learning rate never reaches its peak.",
            f"Use {max(1, t.max_steps // 20)} steps.",
            {"training.schedule.warmup_steps": max(1, t.max_steps // 20)},
        )


# -- hardware ----------------------------------------------------------------------------------------------


@rule("precision_unsupported", "fp32_on_gpu", "fp32_on_bf16_cpu")
def rule_precision_for_hardware(ctx: LintContext) -> Iterator[Advice]:
    hardware, precision = ctx.hardware, ctx.training.precision
    if hardware is None:
        return
    if not hardware.supports(precision):
        alternative = next((p for p in ("bf16", "fp16") if hardware.supports(p)), "fp32")
        yield Advice(
            "precision_unsupported",
            "warning",
            "training.precision",
            f"{hardware.name} does not train in {precision}.",
            f"Use {alternative}.",
            {"training.precision": alternative},
        )
    elif precision == "fp32" and hardware.kind == "gpu" and _low_precision(hardware):
        low = _low_precision(hardware)
        yield Advice(
            "fp32_on_gpu",
            "info",
            "training.precision",
            f"fp32 leaves {hardware.name}'s tensor cores idle: {low} is several times faster and shrinks "
            "activation memory (master weights stay fp32).",
            f"Use {low}.",
            {"training.precision": low},
        )
    elif precision == "fp32" and hardware.kind == "cpu" and hardware.supports("bf16"):
        # The CPU profile offers bf16 only where the CPU multiplies it natively (workers.engine.hardware).
        yield Advice(
            "fp32_on_bf16_cpu",
            "info",
            "training.precision",
            "This CPU multiplies bf16 natively (AMX or AVX-512 BF16): bf16 autocast trains faster than fp32 with "
            "fp32 master weights, to the same validation loss on the tiny demo (python -m bench.precision).",
            "Use bf16.",
            {"training.precision": "bf16"},
        )


@rule("fp16_scaler")
def rule_fp16_scaler(ctx: LintContext) -> Iterator[Advice]:
    if ctx.hardware is not None and ctx.training.precision == "fp16":
        yield Advice(
            "fp16_scaler",
            "info",
            "training.precision",
            "fp16 has a narrow range: the loss is scaled to keep gradients from underflowing, and a few "
            "steps are skipped when they overflow.",
            "Prefer bf16 where the hardware has it.",
        )


# -- data budget -------------------------------------------------------------------------------------------


@rule("overfit_risk")
def rule_overfit_risk(ctx: LintContext) -> Iterator[Advice]:
    if ctx.data_budget is None:
        return
    tokens, parameters = ctx.data_budget
    per_param = tokens / parameters
    if per_param < OVERFIT_TOKENS_PER_PARAMETER:
        yield Advice(
            "overfit_risk",
            "warning",
            "model.num_layers",
            f"The data has {per_param:.2f} tokens per parameter ({tokens:,} tokens, "
            f"{parameters / 1e6:.1f}M parameters): a model this large can memorise it instead of "
            "generalising.",
            "Use a smaller model (fewer layers or a narrower hidden size), more data, or dropout 0.1 with "
            "weight decay.",
        )


@rule("too_many_epochs")
def rule_too_many_epochs(ctx: LintContext) -> Iterator[Advice]:
    if ctx.data_budget is None:
        return
    tokens, _ = ctx.data_budget
    per_step = ctx.spec.tokens_per_step
    epochs = per_step * ctx.training.max_steps / tokens
    if epochs > MAX_USEFUL_EPOCHS:
        useful = max(1, int(MAX_USEFUL_EPOCHS * tokens / per_step))
        yield Advice(
            "too_many_epochs",
            "warning",
            "training.max_steps",
            f"The run reads the data {epochs:.0f} times: after a few passes validation loss turns up.",
            f"Train for about {useful} steps, or use early stopping.",
            {"training.max_steps": useful},
        )


@rule("small_data_no_dropout")
def rule_small_data_no_dropout(ctx: LintContext) -> Iterator[Advice]:
    if ctx.data_budget is None:
        return
    tokens, parameters = ctx.data_budget
    per_param = tokens / parameters
    if per_param < 20 and ctx.model.dropout == 0 and per_param >= OVERFIT_TOKENS_PER_PARAMETER:
        yield Advice(
            "small_data_no_dropout",
            "info",
            "model.dropout",
            f"With {per_param:.1f} tokens per parameter (under Chinchilla's ~20) regularisation helps.",
            "Use dropout 0.1.",
            {"model.dropout": 0.1},
        )


def _low_precision(hardware: HardwareProfile) -> str | None:
    return next((p for p in ("bf16", "fp16") if hardware.supports(p)), None)


def spec_ignoring_cross_field_rules(raw: dict[str, Any]) -> Spec:
    """A ``Spec`` whose sections are validated field by field but whose cross-field rules are not checked.

    Raises ``ValidationError`` when a field itself is invalid. Only for advice: never train on it.
    """
    data = migrate(raw)
    model = ModelSpec.model_validate(data.get("model", {}))
    training = TrainingSpec.model_validate(data.get("training", {}))
    sections = DataSpec.model_validate(data.get("data", {}))
    return Spec.model_construct(version=data.get("version", 1), model=model, training=training, data=sections)


def lint_raw(
    raw: dict[str, Any],
    *,
    hardware: HardwareProfile | None = None,
    num_gpus: int = 1,
    dataset_tokens: int | None = None,
) -> list[Advice]:
    """``lint`` for a raw spec dict that may break cross-field rules; [] when a field itself is invalid
    (validation errors say more than advice then)."""
    try:
        spec = spec_ignoring_cross_field_rules(raw)
    except (ValidationError, TypeError, AttributeError):
        return []
    return lint(spec, hardware=hardware, num_gpus=num_gpus, dataset_tokens=dataset_tokens)
