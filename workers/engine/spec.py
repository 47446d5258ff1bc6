"""THE configuration schema: the only definition of what a model/training/data configuration is.

The wizard produces a ``Spec``, the JSON editor edits one (its JSON Schema is ``Spec.model_json_schema()``),
the API validates with it and the engine consumes it. Every field carries a description; bounds are enforced
per field and cross-field rules in ``Spec``'s validator. Unknown keys are rejected at every level.

Errors name the field path: ``spec_errors(exc)`` turns a ``ValidationError`` into ``[{"path", "message"}]`` where
``path`` is dotted (``"model.moe.top_k"``), including for cross-field rules, which carry their path in the
error context.

``SPEC_VERSION`` is stored in every spec; ``migrate(raw)`` upgrades an older dict before validation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

SPEC_VERSION = 1

# Byte-level tokenizer: ids 0..255 are bytes, then these specials. Kept here because the spec's
# vocab-size rule depends on it and data.py builds the tokenizer from the same constants.
BYTE_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
BYTE_VOCAB_SIZE = 256 + len(BYTE_SPECIAL_TOKENS)


class _Strict(BaseModel):
    """Every section: unknown fields are refused, and values are not coerced (strict mode): ``"2"`` and ``true`` are
    not integers, ``1`` is not a boolean. A person who wrote them meant something the spec cannot guess; the error
    names the field. (An integer is still a number where a float is asked for.)"""

    model_config = ConfigDict(extra="forbid", validate_assignment=False, frozen=False, strict=True)


class MoESpec(_Strict):
    """The DeepSeekMoE feed-forward: shared experts always on, fine-grained routed experts chosen top-k."""

    num_routed_experts: int = Field(8, ge=1, le=512, description="Routed experts per MoE layer.")
    num_shared_experts: int = Field(
        1, ge=0, le=16, description="Shared experts per MoE layer, applied to every token (0 for none)."
    )
    top_k: int = Field(2, ge=1, le=32, description="Routed experts each token is sent to.")
    expert_hidden_size: int = Field(
        512,
        ge=4,
        le=65536,
        description="Hidden size of one expert's feed-forward (fine-grained experts are small).",
    )
    first_dense_layers: int = Field(
        0,
        ge=0,
        le=256,
        description="Layers at the bottom that use a dense feed-forward instead of MoE (DeepSeek uses 1-3).",
    )
    dense_hidden_size: int | None = Field(
        None,
        ge=4,
        le=262144,
        description="Hidden size of the dense feed-forward layers; default: expert_hidden_size × (top_k + shared).",
    )
    scoring: Literal["softmax", "sigmoid"] = Field(
        "softmax",
        description="Gate scoring function: softmax over experts, or per-expert sigmoid (DeepSeek-V3).",
    )
    router_temperature: float = Field(
        1.0, gt=0.0, le=10.0, description="Router logits are divided by this before scoring."
    )
    balancing: Literal["aux_loss", "aux_free", "none"] = Field(
        "aux_free",
        description="Load balancing: an auxiliary loss, DeepSeek-V3's auxiliary-loss-free bias update, or none.",
    )
    aux_loss_coef: float = Field(0.01, ge=0.0, le=1.0, description="Coefficient of the auxiliary balance loss.")
    bias_update_speed: float = Field(
        1e-3,
        ge=0.0,
        le=0.1,
        description="aux_free: each step, bias += speed × sign(mean load − expert load).",
    )
    router_z_loss_coef: float = Field(
        0.0, ge=0.0, le=1.0, description="Coefficient of the router z-loss (penalises large router logits)."
    )
    capacity_factor: float | None = Field(
        None,
        gt=0.0,
        le=64.0,
        description="Token dropping: an expert takes at most capacity_factor × tokens × top_k / experts "
        "assignments per batch; null means no dropping.",
    )
    n_group: int = Field(
        1,
        ge=1,
        le=512,
        description="Group-limited routing (DeepSeek-V3's node-limited routing): the routed experts are split "
        "into n_group equal groups of consecutive experts and each token chooses only within topk_group of "
        "them. 1: no groups.",
    )
    topk_group: int = Field(
        1,
        ge=1,
        le=512,
        description="Groups a token may route to: the topk_group groups with the best scores (a group's score "
        "is the sum of its two best expert scores with sigmoid scoring, its best expert score with softmax). "
        "Equal to n_group: no limit.",
    )
    routed_scaling_factor: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="Multiplies the routed experts' weighted output (not the shared experts'); DeepSeek-V3 uses "
        "2.5 with 8 of 256 experts, so that normalised sigmoid weights do not shrink the routed part.",
    )

    @property
    def resolved_dense_hidden_size(self) -> int:
        """The dense FFN width actually used (the default matches the MoE layer's active width)."""
        if self.dense_hidden_size is not None:
            return self.dense_hidden_size
        return self.expert_hidden_size * (self.top_k + self.num_shared_experts)


class MLASpec(_Strict):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values are up-projected from a small latent per
    token, which is all the KV cache keeps (with one rotary key shared by every head)."""

    q_lora_rank: int = Field(
        0,
        ge=0,
        le=65536,
        description="Rank of the compressed query (down-projection, RMSNorm, per-head up-projection); "
        "0: queries are projected directly from the residual stream (DeepSeek-V2-Lite).",
    )
    kv_lora_rank: int = Field(
        128,
        ge=1,
        le=65536,
        description="Rank of the key/value latent c_kv (RMS-normalised); with qk_rope_head_dim it is what the "
        "KV cache stores per token and layer.",
    )
    qk_nope_head_dim: int = Field(
        64,
        ge=1,
        le=1024,
        description="Per-head query/key dimensions without position encoding (keys up-projected from the latent).",
    )
    qk_rope_head_dim: int = Field(
        32,
        ge=2,
        le=1024,
        description="Per-head query/key dimensions with rotary encoding (decoupled RoPE); the rotary key is "
        "computed once per token from the input and shared by every head. Must be even.",
    )
    v_head_dim: int = Field(64, ge=1, le=1024, description="Per-head value dimensions (up-projected from the latent).")


class ModelSpec(_Strict):
    """The decoder-only transformer."""

    task: Literal["causal_lm", "classification"] = Field(
        "causal_lm", description="Next-token generation, or sequence classification with a label head."
    )
    num_labels: int | None = Field(
        None, ge=2, le=10000, description="Number of classes; required for classification, null otherwise."
    )
    vocab_size: int = Field(8192, ge=BYTE_VOCAB_SIZE, le=262144, description="Token vocabulary size.")
    num_layers: int = Field(4, ge=1, le=256, description="Transformer blocks.")
    hidden_size: int = Field(256, ge=8, le=32768, description="Residual stream width (d_model).")
    num_heads: int = Field(4, ge=1, le=256, description="Attention (query) heads; must divide hidden_size.")
    num_kv_heads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Key/value heads for grouped-query attention; must divide num_heads. Null: same as num_heads.",
    )
    attention: Literal["mha", "gqa", "mla"] = Field(
        "mha",
        description="Attention: multi-head (a key/value head per query head), grouped-query (num_kv_heads "
        "key/value heads, each shared by a group of query heads) or multi-head latent attention (DeepSeek-V2/V3: "
        "keys and values from a compressed latent, see mla).",
    )
    mla: MLASpec = Field(
        default_factory=MLASpec, description="Multi-head latent attention settings (used when attention is mla)."
    )
    max_seq_len: int = Field(256, ge=8, le=131072, description="Longest sequence the position encoding supports.")
    activation: Literal["swiglu", "gelu", "relu"] = Field(
        "swiglu", description="Feed-forward activation (SwiGLU uses a gated pair of input projections)."
    )
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="Normalisation layer.")
    norm_eps: float = Field(1e-6, gt=0.0, le=1e-2, description="Epsilon of the normalisation layers.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on residual branches and embeddings.")
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention probabilities.")
    tie_embeddings: bool = Field(True, description="Share the input embedding and the output projection.")
    rope_theta: float = Field(10000.0, gt=1.0, le=1e8, description="Base of the rotary position encoding.")
    init_std: float = Field(0.02, gt=0.0, le=1.0, description="Standard deviation of the weight initialisation.")
    mtp_depth: int = Field(
        0,
        ge=0,
        le=8,
        description="Multi-token prediction (DeepSeek-V3): extra sequential modules, module d predicting the "
        "token d+1 positions after the next one; they share the embedding and output head, are trained with "
        "training.mtp_loss_weight and are ignored by generation. 0: next-token prediction only.",
    )
    moe: MoESpec = Field(default_factory=MoESpec, description="Mixture-of-experts feed-forward settings.")

    @model_validator(mode="before")
    @classmethod
    def _grouped_query_from_num_kv_heads(cls, data: Any) -> Any:
        # Specs written before ``attention`` existed asked for grouped-query attention with num_kv_heads alone:
        # they keep meaning what they meant (an explicit ``attention`` is never overridden).
        if isinstance(data, dict) and "attention" not in data:
            kv = data.get("num_kv_heads")
            if kv is not None and kv != data.get("num_heads", cls.model_fields["num_heads"].default):
                data = {**data, "attention": "gqa"}
        return data

    @property
    def kv_heads(self) -> int:
        """Key/value heads of MHA/GQA attention (MLA up-projects one key and value per query head)."""
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def rope_dim(self) -> int:
        """Width of the rotary encoding: the head dimension, or MLA's decoupled rotary part."""
        return self.mla.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_layers - self.moe.first_dense_layers)


# Each beta is checked strictly (a number); the pair may come as a JSON list (strict mode wants a Python tuple).
Beta = Annotated[float, Strict(), Field(ge=0.0, lt=1.0)]


_OPTIMIZER_NAME = "Optimizer: adamw (the default when name is left out), adafactor, sgd or muon."


class AdamWSpec(_Strict):
    """AdamW with decoupled weight decay (fused where torch has it)."""

    name: Literal["adamw"] = Field("adamw", description=_OPTIMIZER_NAME)
    lr: float = Field(3e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), strict=False, description="AdamW betas (each in [0, 1)).")
    eps: float = Field(1e-8, gt=0.0, le=1e-2, description="AdamW epsilon.")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="Decoupled weight decay (not on norms/biases).")


class AdafactorSpec(_Strict):
    """Adafactor (``torch.optim.Adafactor``): factored second moments, so its state is a row and a column per
    matrix instead of a full copy; each update is relative to the parameter's scale."""

    name: Literal["adafactor"] = Field(description=_OPTIMIZER_NAME)
    lr: float = Field(
        1e-2,
        gt=0.0,
        le=1.0,
        description="Peak relative step size: an update moves a parameter by about lr × its RMS (at least eps), "
        "and torch caps the step at 1/sqrt(step).",
    )
    beta2_decay: float = Field(
        -0.8,
        ge=-1.0,
        le=0.0,
        description="Second-moment decay exponent: the running average uses beta2 = 1 - step^beta2_decay.",
    )
    eps: float = Field(
        1e-3,
        gt=0.0,
        le=1.0,
        description="Floor of the parameter scale that multiplies each update (lets zero-initialised parameters move).",
    )
    clip_threshold: float = Field(
        1.0, gt=0.0, le=100.0, description="An update whose RMS exceeds this is scaled down to it."
    )
    weight_decay: float = Field(
        0.0, ge=0.0, le=1.0, description="Decoupled weight decay on matrices (not on norms, biases or embeddings)."
    )


class SGDSpec(_Strict):
    """Stochastic gradient descent with (Nesterov) momentum."""

    name: Literal["sgd"] = Field(description=_OPTIMIZER_NAME)
    lr: float = Field(0.1, gt=0.0, le=10.0, description="Peak learning rate.")
    momentum: float = Field(0.9, gt=0.0, lt=1.0, description="Momentum factor.")
    nesterov: bool = Field(True, description="Nesterov momentum (the gradient step looks ahead along the momentum).")
    weight_decay: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="L2 penalty added to the gradients of matrices (not norms, biases or embeddings).",
    )


class MuonSpec(_Strict):
    """Muon for the hidden weight matrices (attention, feed-forward and expert projections: their update is
    orthogonalised by Newton-Schulz iterations) and AdamW for the rest (embeddings, head, norms, router, biases),
    as Moonlight trains."""

    name: Literal["muon"] = Field(description=_OPTIMIZER_NAME)
    lr: float = Field(3e-4, gt=0.0, le=1.0, description="Peak learning rate of the matrices Muon updates.")
    momentum: float = Field(0.95, ge=0.0, lt=1.0, description="Muon's momentum factor.")
    nesterov: bool = Field(True, description="Nesterov momentum for Muon's matrices.")
    weight_decay: float = Field(0.1, ge=0.0, le=1.0, description="Decoupled weight decay of Muon's matrices.")
    ns_steps: int = Field(5, ge=1, le=20, description="Newton-Schulz iterations that orthogonalise each update.")
    adjust_lr: Literal["original", "match_rms_adamw"] = Field(
        "match_rms_adamw",
        description="Per-matrix learning-rate scale: match_rms_adamw (Moonlight: 0.2 × sqrt(max dimension), so "
        "AdamW's learning rate and weight decay carry over) or original (Keller Jordan's sqrt(max(1, out/in))).",
    )
    adamw_lr: float = Field(
        3e-4, gt=0.0, le=1.0, description="Peak learning rate of the AdamW part (embeddings, head, norms, router)."
    )
    adamw_betas: tuple[Beta, Beta] = Field(
        (0.9, 0.95), strict=False, description="Betas of the AdamW part (each in [0, 1))."
    )
    adamw_weight_decay: float = Field(
        0.1, ge=0.0, le=1.0, description="Decoupled weight decay of the AdamW part's matrices (not norms, biases)."
    )


OptimizerSpec = AdamWSpec | AdafactorSpec | SGDSpec | MuonSpec
OPTIMIZER_NAMES = ("adamw", "adafactor", "sgd", "muon")


def _optimizer_name(value: Any) -> Any:
    """The discriminator of ``training.optimizer``: its ``name``, ``adamw`` when left out (older specs)."""
    if isinstance(value, dict):
        return value.get("name", "adamw")
    return getattr(value, "name", None)


_Optimizer = Annotated[
    Annotated[AdamWSpec, Tag("adamw")]
    | Annotated[AdafactorSpec, Tag("adafactor")]
    | Annotated[SGDSpec, Tag("sgd")]
    | Annotated[MuonSpec, Tag("muon")],
    Discriminator(
        _optimizer_name,
        custom_error_type="optimizer_name",
        custom_error_message="name must be one of 'adamw', 'adafactor', 'sgd', 'muon'",
    ),
]


def _optimizer_discriminator(schema: dict[str, Any]) -> None:
    """Say in the JSON Schema that ``name`` chooses the optimizer (OpenAPI's discriminator, in the form pydantic
    writes for a plain-field discriminator), so that the browser editor completes and checks the chosen
    optimizer's own fields. pydantic cannot derive it from the callable discriminator above, which the default
    (no name: adamw) needs. The references are pydantic's own (it rewrites them into ``$defs`` or OpenAPI
    components afterwards, mapping values included, as for the discriminators it writes)."""
    names = [get_args(cls.model_fields["name"].annotation)[0] for cls in get_args(OptimizerSpec)]
    # (the oneOf lists the choices in the order of the union, which OptimizerSpec repeats)
    assert len(names) == len(schema["oneOf"])
    schema["discriminator"] = {
        "propertyName": "name",
        "mapping": {name: choice["$ref"] for name, choice in zip(names, schema["oneOf"], strict=True)},
    }


class ScheduleSpec(_Strict):
    """Learning rate as a pure function of the step: linear warmup, then decay to a floor."""

    kind: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine",
        description="Learning-rate decay after warmup: cosine or linear to the floor at max_steps, constant, or "
        "warmup-stable-decay (the peak until the last decay_fraction of the run, then linear to the floor).",
    )
    warmup_steps: int = Field(100, ge=0, le=10_000_000, description="Linear warmup from 0 to the peak LR.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Floor of the decay, as a fraction of the peak LR.")
    decay_fraction: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="wsd: fraction of max_steps at the end of the run over which the rate decays (never "
        "before warmup ends).",
    )


class PlateauSpec(_Strict):
    """Automatic interventions when validation loss stops improving."""

    enabled: bool = Field(True, description="Watch validation loss and intervene on a plateau.")
    patience: int = Field(3, ge=1, le=1000, description="Evaluations without improvement that count as a plateau.")
    min_delta: float = Field(1e-3, ge=0.0, le=10.0, description="Smallest decrease of val loss that counts.")
    reduce_lr: bool = Field(True, description="On a plateau, multiply the learning rate by lr_factor.")
    lr_factor: float = Field(0.3, gt=0.0, lt=1.0, description="LR multiplier applied at each plateau.")
    raise_dropout: bool = Field(True, description="On a plateau, raise dropout to dropout_to (if lower).")
    dropout_to: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout set by the intervention.")
    tighten_clip: bool = Field(True, description="On a plateau, clip gradients at clip_to (if looser).")
    clip_to: float = Field(1.0, gt=0.0, le=1000.0, description="Gradient-clipping norm set by the intervention.")
    max_interventions: int = Field(3, ge=0, le=100, description="Stop intervening after this many plateaus.")


class AnomalySpec(_Strict):
    """Loss spike / non-finite detection against a rolling window."""

    enabled: bool = Field(True, description="Detect non-finite or spiking losses.")
    window: int = Field(
        20,
        ge=3,
        le=10000,
        description="Steps in the rolling window of recent losses (emptied when a plateau raises dropout: "
        "the guard judges again once the window has refilled under the new dropout).",
    )
    threshold: float = Field(
        6.0, gt=0.0, le=1000.0, description="A loss above mean + threshold × std of the window is an anomaly."
    )
    action: Literal["rollback", "stop"] = Field(
        "rollback", description="Roll back to the last checkpoint and skip the batch, or stop the run."
    )
    max_rollbacks: int = Field(3, ge=0, le=100, description="After this many rollbacks, stop instead.")


class DistributedSpec(_Strict):
    """How many devices one job trains on and how the work is split between them (torch.distributed).

    Every device runs one process (``torch.distributed.run``); ``training.batch_size`` stays the *global* micro-batch
    (each device takes ``batch_size / devices`` of it), so a run on N devices takes the steps a 1-device run takes.
    """

    devices: int = Field(
        1, ge=1, le=1024, description="Devices (processes) the job trains on; more than 1 runs torch.distributed."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every device holds the whole model and gradients are averaged (DistributedDataParallel); "
        "fsdp: parameters, gradients and optimizer state are sharded over the devices (FSDP2 fully_shard), for "
        "models that do not fit one device.",
    )
    expert_parallel: bool = Field(
        False,
        description="Shard the routed experts over the devices (each holds num_routed_experts / devices of them) "
        "and send tokens to their experts with all-to-all; the rest of the model is data parallel (ddp).",
    )


class TrainingSpec(_Strict):
    """The training loop: batching, optimisation, precision, evaluation, checkpoints and safeguards."""

    batch_size: int = Field(8, ge=1, le=65536, description="Micro-batch size (sequences per forward pass).")
    grad_accum_steps: int = Field(1, ge=1, le=4096, description="Micro-batches accumulated per optimizer step.")
    max_steps: int = Field(1000, ge=1, le=100_000_000, description="Optimizer steps to train.")
    optimizer: _Optimizer = Field(
        default_factory=AdamWSpec,
        description="Optimizer and its settings; name chooses it (adamw when left out).",
        json_schema_extra=_optimizer_discriminator,
    )
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule.")
    grad_clip: float | None = Field(1.0, gt=0.0, le=1000.0, description="Clip the global gradient norm; null: off.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision; fp16 uses a gradient scaler and needs CUDA."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute block activations in backward to save memory.")
    compile: bool = Field(
        False,
        description="torch.compile the model's blocks for training (TorchInductor; the expert matmuls stay one "
        "opaque grouped operator, the output head eager). Costs a one-off compile at the first step of each start "
        "(a 'compiling' phase of the job: 8-16 s for the templates on a quiet 2-core CPU, 21-42 s on a busy one; "
        "bench.compile) and a recompile when a plateau intervention changes dropout; saves per-operator overhead "
        "and fuses the elementwise work (CPU templates: 0.96-1.0x the eager step, the text classifier's 1.0-1.07x, "
        "so its template leaves it off). Off by default: a short run such as the tiny demo does not pay the compile "
        "back; single-process runs only (distributed runs train eager).",
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the cross-entropy.")
    mtp_loss_weight: float = Field(
        0.3,
        ge=0.0,
        le=10.0,
        description="Weight of the multi-token prediction loss (the mean over model.mtp_depth modules) added to "
        "the next-token loss; DeepSeek-V3 uses 0.3, then 0.1. Unused when mtp_depth is 0.",
    )
    loss: Literal["cross_entropy", "focal"] = Field(
        "cross_entropy", description="Loss; focal is for classification only."
    )
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0, description="Focusing parameter of the focal loss.")
    log_interval: int = Field(1, ge=1, le=100000, description="Emit training metrics every this many steps.")
    eval_interval: int = Field(100, ge=1, le=10_000_000, description="Evaluate on validation data every N steps.")
    eval_batches: int = Field(8, ge=1, le=10000, description="Validation micro-batches per evaluation.")
    early_stopping_patience: int | None = Field(
        None, ge=1, le=10000, description="Stop after this many evaluations without improvement; null: never."
    )
    checkpoint_interval: int = Field(100, ge=1, le=10_000_000, description="Write a checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=2, le=1000, description="Checkpoints kept on disk (the latest k, k ≥ 2).")
    seed: int = Field(1234, ge=0, le=2**32 - 1, description="Seed of every random number generator.")
    plateau: PlateauSpec = Field(default_factory=PlateauSpec, description="Plateau interventions.")
    anomaly: AnomalySpec = Field(default_factory=AnomalySpec, description="Anomaly detection.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Devices per job and how training is split over them."
    )


class DataSpec(_Strict):
    """How the dataset is read, tokenized and split."""

    tokenizer: Literal["bytes", "bpe"] = Field(
        "bpe", description="Byte-level tokens (259 ids), or byte-level BPE trained on the data."
    )
    bpe_vocab_size: int | None = Field(
        None,
        ge=BYTE_VOCAB_SIZE,
        le=262144,
        description="BPE vocabulary to train; null: model.vocab_size. Must not exceed model.vocab_size.",
    )
    seq_len: int = Field(256, ge=8, le=131072, description="Tokens per training sequence.")
    val_fraction: float = Field(0.05, gt=0.0, le=0.5, description="Fraction of the data held out for validation.")
    text_field: str = Field("text", min_length=1, max_length=200, description="Field/column holding the text.")
    label_field: str = Field("label", min_length=1, max_length=200, description="Field/column holding the label.")


class Spec(_Strict):
    """A complete configuration: what model to build, how to train it, how to read the data."""

    version: Literal[1] = Field(1, description="Schema version, for migrations.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model architecture.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training loop settings.")
    data: DataSpec = Field(default_factory=DataSpec, description="Data and tokenizer settings.")

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_an_integer(cls, value: Any) -> Any:
        # Lax mode would read true or 1.0 as version 1; a stored spec's version must be exact.
        if type(value) is not int:
            raise ValueError(f"version must be an integer, got {value!r}")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Spec:
        problems = cross_field_problems(self)
        if problems:
            path, message = problems[0]
            raise PydanticCustomError(
                "cross_field",
                "{message}",
                {
                    "path": path,
                    "message": message,
                    "problems": [{"path": p, "message": m} for p, m in problems],
                },
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.training.batch_size * self.training.grad_accum_steps * self.data.seq_len


def cross_field_problems(spec: Spec) -> list[tuple[str, str]]:
    """Every rule that spans fields, as ``(dotted path of the field to change, message)``."""
    m, t, d = spec.model, spec.training, spec.data
    out: list[tuple[str, str]] = []
    if m.hidden_size % m.num_heads:
        out.append(("model.num_heads", f"num_heads ({m.num_heads}) must divide hidden_size ({m.hidden_size})"))
    elif m.head_dim % 2:
        out.append(("model.num_heads", f"head dimension {m.head_dim} must be even for rotary embeddings"))
    if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
        out.append(("model.num_kv_heads", f"num_kv_heads ({m.num_kv_heads}) must divide num_heads ({m.num_heads})"))
    if m.attention == "mha" and m.num_kv_heads not in (None, m.num_heads):
        out.append(
            (
                "model.num_kv_heads",
                f"multi-head attention has one key/value head per query head: num_kv_heads must be null or "
                f"{m.num_heads}; use attention gqa for {m.num_kv_heads} key/value heads",
            )
        )
    if m.attention == "gqa" and m.num_kv_heads is None:
        out.append(("model.num_kv_heads", "grouped-query attention needs num_kv_heads (a divisor of num_heads)"))
    if m.attention == "mla" and m.num_kv_heads is not None:
        out.append(
            (
                "model.num_kv_heads",
                "multi-head latent attention up-projects keys and values per query head: num_kv_heads must be null",
            )
        )
    if m.attention == "mla" and m.mla.qk_rope_head_dim % 2:
        out.append(
            (
                "model.mla.qk_rope_head_dim",
                f"qk_rope_head_dim ({m.mla.qk_rope_head_dim}) must be even for rotary embeddings",
            )
        )
    if m.mtp_depth > 0 and m.task != "causal_lm":
        out.append(("model.mtp_depth", "multi-token prediction predicts tokens: use mtp_depth 0 for classification"))
    if m.moe.top_k > m.moe.num_routed_experts:
        out.append(
            (
                "model.moe.top_k",
                f"top_k ({m.moe.top_k}) cannot exceed num_routed_experts ({m.moe.num_routed_experts})",
            )
        )
    moe = m.moe
    if moe.num_routed_experts % moe.n_group:
        out.append(
            (
                "model.moe.n_group",
                f"n_group ({moe.n_group}) must divide num_routed_experts ({moe.num_routed_experts})",
            )
        )
    elif moe.topk_group > moe.n_group:
        out.append(("model.moe.topk_group", f"topk_group ({moe.topk_group}) cannot exceed n_group ({moe.n_group})"))
    elif moe.num_routed_experts >= moe.top_k > moe.topk_group * (moe.num_routed_experts // moe.n_group):
        # (top_k above the expert count is the top_k rule's problem, not the groups')
        eligible = moe.topk_group * (moe.num_routed_experts // moe.n_group)
        out.append(
            (
                "model.moe.topk_group",
                f"top_k ({moe.top_k}) experts cannot come from {moe.topk_group} of {moe.n_group} groups "
                f"({eligible} eligible experts): raise topk_group",
            )
        )
    if m.moe.first_dense_layers > m.num_layers:
        out.append(
            (
                "model.moe.first_dense_layers",
                f"first_dense_layers ({m.moe.first_dense_layers}) cannot exceed num_layers ({m.num_layers})",
            )
        )
    if m.task == "classification" and m.num_labels is None:
        out.append(("model.num_labels", "num_labels is required when task is classification"))
    if m.task == "causal_lm" and m.num_labels is not None:
        out.append(("model.num_labels", "num_labels must be null when task is causal_lm"))
    if t.loss == "focal" and m.task != "classification":
        out.append(("training.loss", "the focal loss is for classification; use cross_entropy for causal_lm"))
    if t.schedule.warmup_steps > t.max_steps:
        out.append(
            (
                "training.schedule.warmup_steps",
                f"warmup_steps ({t.schedule.warmup_steps}) cannot exceed max_steps ({t.max_steps})",
            )
        )
    out.extend(_distributed_problems(spec))
    if d.seq_len > m.max_seq_len:
        out.append(("data.seq_len", f"seq_len ({d.seq_len}) cannot exceed model.max_seq_len ({m.max_seq_len})"))
    if d.bpe_vocab_size is not None and d.bpe_vocab_size > m.vocab_size:
        out.append(
            (
                "data.bpe_vocab_size",
                f"bpe_vocab_size ({d.bpe_vocab_size}) cannot exceed model.vocab_size ({m.vocab_size})",
            )
        )
    if d.tokenizer == "bytes" and d.bpe_vocab_size is not None:
        out.append(("data.bpe_vocab_size", "bpe_vocab_size must be null with the bytes tokenizer"))
    return out


def _distributed_problems(spec: Spec) -> list[tuple[str, str]]:
    """The rules of ``training.distributed``: what the engine's distributed path can run exactly."""
    t, dist = spec.training, spec.training.distributed
    n = dist.devices
    out: list[tuple[str, str]] = []
    if t.batch_size % n:
        out.append(
            (
                "training.distributed.devices",
                f"devices ({n}) must divide training.batch_size ({t.batch_size}): each device trains on an equal "
                "share of the batch",
            )
        )
    if dist.expert_parallel:
        experts = spec.model.moe.num_routed_experts
        if experts % n:
            out.append(
                (
                    "training.distributed.expert_parallel",
                    f"expert parallelism needs model.moe.num_routed_experts ({experts}) divisible by devices ({n})",
                )
            )
        if dist.strategy == "fsdp":
            out.append(
                (
                    "training.distributed.expert_parallel",
                    "expert parallelism runs the rest of the model data parallel: use strategy ddp with it",
                )
            )
        if t.precision == "fp16" and n > 1:
            # Each rank's loss scaler would judge its own experts' gradients: one rank could skip a step another takes.
            out.append(("training.distributed.expert_parallel", "expert parallelism trains in fp32 or bf16: use bf16"))
    if dist.strategy == "fsdp" and n > 1:
        if t.optimizer.name == "muon":
            # Muon orthogonalises whole matrices; FSDP gives each device a slice of each one.
            out.append(("training.distributed.strategy", "fsdp shards matrices that muon needs whole: use ddp"))
        if t.precision == "fp16":
            out.append(("training.distributed.strategy", "fsdp trains in fp32 or bf16 here: use bf16, or ddp"))
    return out


def _field_path(loc: tuple[int | str, ...], error_type: str) -> str:
    """The dotted path a person writes for an error location: pydantic puts the chosen optimizer's tag in the
    location (``training.optimizer.muon.lr``), which is not a key of the spec; an unknown optimizer is an
    error of ``training.optimizer.name``."""
    parts = [str(p) for p in loc]
    for i in range(2, len(parts)):
        if parts[i - 2 : i] == ["training", "optimizer"] and parts[i] in OPTIMIZER_NAMES:
            del parts[i]
            break
    if error_type == "optimizer_name":
        parts.append("name")
    return ".".join(parts)


def spec_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Flatten a ``ValidationError`` into ``[{"path": "model.moe.top_k", "message": ...}]``."""
    out: list[dict[str, str]] = []
    for err in exc.errors(include_url=False):
        ctx = err.get("ctx") or {}
        if err["type"] == "cross_field":
            out.extend({"path": p["path"], "message": p["message"]} for p in ctx["problems"])
        else:
            out.append({"path": _field_path(err["loc"], err["type"]), "message": err["msg"]})
    return out


# Migrations: MIGRATIONS[v] turns a version-v dict into a version-(v+1) dict. Empty while only v1 exists;
# the mechanism is here so that a stored spec never becomes unreadable when the schema changes.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Upgrade a raw spec dict to ``SPEC_VERSION`` (a dict without ``version`` is taken as current)."""
    data = dict(raw)
    version = data.get("version", SPEC_VERSION)
    if not isinstance(version, int) or version < 1 or version > SPEC_VERSION:
        return data  # let validation report the bad version with its path
    while version < SPEC_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
        data["version"] = version
    return data


def load_spec(raw: dict[str, Any]) -> Spec:
    """Migrate, then validate. Raises ``ValidationError`` (use ``spec_errors`` for field paths)."""
    return Spec.model_validate(migrate(integral_numbers(raw)))


def integral_numbers(value: Any) -> Any:
    """``value`` with every float that holds an integer (``690.0``) as that integer, all the way down.

    JSON has one number type and JSON Schema counts ``690.0`` as an integer: a spec that says ``"seq_len": 690.0``
    matches the published schema and means 690. Strict validation would refuse the float; text (``"690"``) and
    booleans are still refused. Where a float is asked for, the integer is a number as good as the float."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {key: integral_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral_numbers(item) for item in value]
    return value


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``Spec`` that the browser editor validates against."""
    return Spec.model_json_schema()
