"""Forms of the configure pages: the wizard's questions, its tweaks, saving, and the comparison's choices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django import forms

from builder.configs.wizard import DATA_SIZES, GPU_COUNTS, HOURS_CHOICES, Answers
from builder.core.profiles import hardware_profile
from workers.engine.hardware import PROFILES

# The wizard's steps, in order, with the answer fields each adds.
STEPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("task", "Task", ("task", "num_labels")),
    ("data", "Data", ("data_size",)),
    ("hardware", "Hardware and budget", ("hardware", "num_gpus", "hours")),
    ("priority", "Speed, quality and use", ("priority", "context", "continue_later")),
)


def _hours_label(hours: float) -> str:
    if hours < 1:
        return f"{round(hours * 60)} minutes"
    if hours < 24:
        return f"{hours:g} hour{'s' if hours != 1 else ''}"
    days = hours / 24
    return f"{days:g} day{'s' if days != 1 else ''}"


class WizardForm(forms.Form):
    """All answers; ``for_step(n)`` makes the fields of steps after ``n`` optional, so each step validates what
    has been asked so far (earlier answers travel as hidden inputs)."""

    task = forms.ChoiceField(
        choices=[
            ("generation", "Generation: continue text (a language model)"),
            ("classification", "Classification: put texts into classes"),
        ],
        widget=forms.RadioSelect,
    )
    num_labels = forms.IntegerField(
        min_value=2, max_value=10000, initial=2, required=False, help_text="Number of classes (classification)."
    )
    data_size = forms.ChoiceField(
        choices=[(d.key, d.label) for d in DATA_SIZES.values()], widget=forms.RadioSelect, label="Amount of data"
    )
    hardware = forms.ChoiceField(choices=[(p.key, p.name) for p in PROFILES.values()], label="GPU type")
    num_gpus = forms.TypedChoiceField(
        choices=[(n, str(n)) for n in GPU_COUNTS], coerce=int, initial=1, label="How many"
    )
    hours = forms.TypedChoiceField(
        choices=[(h, _hours_label(h)) for h in HOURS_CHOICES], coerce=float, initial=1, label="Training budget"
    )
    priority = forms.ChoiceField(
        choices=[
            ("speed", "Speed: a smaller model that finishes sooner"),
            ("quality", "Quality: the best model the data and budget allow"),
        ],
        widget=forms.RadioSelect,
    )
    context = forms.ChoiceField(
        choices=[
            ("short", "Short texts: prompts and replies of a few hundred tokens (or classification)"),
            ("long", "Long texts: generating from long documents or conversations, or for many users at once"),
        ],
        widget=forms.RadioSelect,
        initial="short",
        required=False,
        label="Length of what it generates",
        help_text="Long generation makes the attention cache the memory that counts: the wizard then proposes "
        "latent or grouped-query attention.",
    )
    continue_later = forms.BooleanField(
        required=False,
        label="I may train it further later (more steps or new data)",
        help_text="Then the learning rate stays at its peak until near the end (warmup-stable-decay), so the run "
        "can be continued.",
    )

    def __init__(self, data: Mapping[str, Any] | None = None, *, step: int = len(STEPS), **kwargs: Any) -> None:
        if data is not None and not data.get("context"):
            # Short texts unless said otherwise: the question then shows its default chosen.
            data = {**{k: data.get(k) for k in data}, "context": "short"}
        super().__init__(data, **kwargs)
        self.step = step
        asked = {name for _, _, names in STEPS[:step] for name in names}
        for name, field in self.fields.items():
            field.required = name in asked and name not in ("num_labels", "context", "continue_later")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("task") == "classification" and not data.get("num_labels"):
            self.add_error("num_labels", "give the number of classes (at least 2)")
        hardware, gpus = data.get("hardware"), data.get("num_gpus")
        if hardware in PROFILES and gpus and gpus > PROFILES[hardware].max_devices:
            self.add_error("num_gpus", f"{PROFILES[hardware].name}: at most {PROFILES[hardware].max_devices}")
        return data

    def answers(self) -> Answers:
        d = self.cleaned_data
        return Answers(
            task=d["task"],
            data_size=d["data_size"],
            hardware=d["hardware"],
            num_gpus=int(d["num_gpus"]),
            hours=float(d["hours"]),
            priority=d["priority"],
            num_labels=int(d.get("num_labels") or 2),
            context="long" if d.get("context") == "long" else "short",
            continue_later=bool(d.get("continue_later")),
            profile=hardware_profile(d["hardware"]),  # the CPU as its live workers describe it
        )


# Fields a person tweaks on the proposal: (dotted path, label, kind). Kinds: int, float, bool, or a tuple of
# choices. Everything else stays as proposed (and is editable in the JSON editor after saving).
TWEAKS: tuple[tuple[str, str, Any], ...] = (
    ("model.num_layers", "Layers", "int"),
    ("model.hidden_size", "Hidden size", "int"),
    ("model.num_heads", "Heads", "int"),
    ("model.attention", "Attention", ("mha", "gqa", "mla")),
    ("model.mtp_depth", "Multi-token prediction modules", "int"),
    ("model.moe.num_routed_experts", "Routed experts", "int"),
    ("model.moe.top_k", "Experts per token (top-k)", "int"),
    ("model.moe.num_shared_experts", "Shared experts", "int"),
    ("model.moe.expert_hidden_size", "Expert hidden size", "int"),
    ("data.seq_len", "Sequence length", "int"),
    ("training.batch_size", "Micro-batch", "int"),
    ("training.grad_accum_steps", "Accumulation steps", "int"),
    ("training.max_steps", "Steps", "int"),
    ("training.optimizer.lr", "Peak learning rate", "float"),
    ("training.schedule.warmup_steps", "Warmup steps", "int"),
    ("model.dropout", "Dropout", "float"),
    ("training.precision", "Precision", ("fp32", "bf16", "fp16")),
    ("training.gradient_checkpointing", "Gradient checkpointing", "bool"),
    ("training.compile", "Compile (torch.compile)", "bool"),
)


# Choices shown with their reasons beside the tweaks (not tweakable there: they come with settings of their own,
# which the JSON editor edits), the rest of the reasons stay folded away.
HIGHLIGHTED_REASONS: tuple[str, ...] = (
    "training.optimizer.name",
    "training.schedule.kind",
    "model.num_kv_heads",
    "model.mla.kv_lora_rank",
    "model.mla.qk_rope_head_dim",
    "training.mtp_loss_weight",
    "model.moe.n_group",
    "model.moe.topk_group",
    "model.moe.routed_scaling_factor",
)


def read_tweaks(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Tweaked values from ``data`` (inputs named ``tweak:<path>``), and per-path errors for unreadable ones.

    A checkbox that is absent means False, but only when the form carried the tweaks (``tweaks`` = 1).
    """
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    if data.get("tweaks") != "1":
        return values, errors
    for path, _label, kind in TWEAKS:
        raw = data.get(f"tweak:{path}")
        if kind == "bool":
            values[path] = raw in ("on", "true", "1")
            continue
        if raw is None or raw == "":
            continue
        try:
            if kind == "int":
                values[path] = int(raw)
            elif kind == "float":
                values[path] = float(raw)
            elif raw in kind:
                values[path] = raw
            else:
                errors[path] = f"choose one of {', '.join(kind)}"
        except ValueError:
            errors[path] = "a whole number" if kind == "int" else "a number"
    return values, errors


def apply_tweaks(spec: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the spec dict with dotted-path values set; positions follow the sequence length."""
    import copy

    out = copy.deepcopy(spec)
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    # The wizard keeps the position table as long as the training sequences.
    out["model"]["max_seq_len"] = max(out["model"]["max_seq_len"], out["data"]["seq_len"])
    return out


class SaveForm(forms.Form):
    name = forms.CharField(max_length=200)
    description = forms.CharField(max_length=5000, required=False, widget=forms.Textarea(attrs={"rows": 2}))
