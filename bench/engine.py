"""Training-step throughput of the engine (``workers.engine``) against Hugging Face MoE models (``make bench``).

``python -m bench.engine [--rounds N] [--warmup N] [--experts 8,64] [--quick]`` prints ONE JSON
document to stdout. Every model runs forward + backward + AdamW step on the same random batch; the models
(and a fp32 matmul peak probe) are interleaved in rounds so that load from other processes hits them alike,
and medians are reported. Hugging Face ``transformers`` is optional (the ``bench`` extra): without it only
this engine runs and the JSON says so.

Comparability: every model has the same vocabulary, width, depth, heads, expert width, top-k and expert
count, untied embeddings, no shared experts, and all layers MoE, so the active parameters per token match
(DeepSeek-V3 differs only by its multi-head latent attention, configured as below). Every model trains with
fused AdamW (what Hugging Face's Trainer uses by default) in one process with the same allocator settings
(freed memory kept, transparent huge pages), and transformers picks its own default kernels (recorded in
``hugging_face_setup``: grouped_mm experts and SDPA attention in transformers 5.24).

A second section, ``deepseek_v3`` (``--deepseek-only`` runs just it, ``--no-deepseek`` skips it), times this
engine's DeepSeek-V3 options against its own default at the same shape and 8 experts, interleaved the same way:
multi-head latent attention and grouped-query attention against multi-head attention (tokens/s and KV-cache
bytes per token), one multi-token prediction module against none (step time), and each optimizer (its step time
and the state it holds, measured and as the estimator predicts). Its ``same_wall_time`` part (``--no-wall-time``
skips it, ``--wall-time-only`` runs just it; a few minutes) trains the tiny demo template on the built-in corpus
for the same time with AdamW, Muon, and AdamW plus one MTP module, and reports each one's validation loss.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import pydoc_data.topics
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.engine.allocator import keep_freed_memory
from workers.engine.data import PreparedData, prepare
from workers.engine.estimate import kv_cache_bytes_per_token, optimizer_state_elements, parameter_breakdown
from workers.engine.kernels import grouped_matmul
from workers.engine.model import KVCache, build_model
from workers.engine.optimizers import Optimizer, build_optimizer
from workers.engine.sinks import MemorySink
from workers.engine.spec import Spec
from workers.engine.train import train


@dataclass(frozen=True)
class Shape:
    vocab: int
    d_model: int
    layers: int
    heads: int
    expert_hidden: int
    top_k: int
    batch: int
    seq_len: int


FULL = Shape(vocab=8192, d_model=256, layers=4, heads=4, expert_hidden=512, top_k=2, batch=8, seq_len=256)
QUICK = Shape(vocab=512, d_model=64, layers=2, heads=4, expert_hidden=64, top_k=2, batch=2, seq_len=32)


def our_spec(shape: Shape, experts: int) -> Spec:
    """This engine configured like the Hugging Face models (no shared experts, all layers MoE)."""
    return Spec.model_validate(
        {
            "model": {
                "vocab_size": shape.vocab,
                "num_layers": shape.layers,
                "hidden_size": shape.d_model,
                "num_heads": shape.heads,
                "max_seq_len": shape.seq_len,
                "tie_embeddings": False,
                "moe": {
                    "num_routed_experts": experts,
                    "num_shared_experts": 0,
                    "top_k": shape.top_k,
                    "expert_hidden_size": shape.expert_hidden,
                    "first_dense_layers": 0,
                    "balancing": "aux_free",
                },
            },
            "training": {"batch_size": shape.batch},
            "data": {"seq_len": shape.seq_len},
        }
    )


def _hf_models(shape: Shape, experts: int) -> dict[str, Callable[[], nn.Module]]:
    """Builders of the Hugging Face models from configs (random init, nothing downloaded)."""
    from transformers import (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    common: dict[str, Any] = {
        "vocab_size": shape.vocab,
        "hidden_size": shape.d_model,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "max_position_embeddings": shape.seq_len,
        "num_experts_per_tok": shape.top_k,
        "tie_word_embeddings": False,
        "output_router_logits": False,
        "use_cache": False,
    }
    head_dim = shape.d_model // shape.heads

    def mixtral() -> nn.Module:
        cfg = MixtralConfig(**common, intermediate_size=shape.expert_hidden, num_local_experts=experts)
        return MixtralForCausalLM(cfg)

    def qwen3_moe() -> nn.Module:
        cfg = Qwen3MoeConfig(
            **common,
            intermediate_size=shape.expert_hidden,
            moe_intermediate_size=shape.expert_hidden,
            num_experts=experts,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        return Qwen3MoeForCausalLM(cfg)

    def deepseek_v3() -> nn.Module:
        cfg = DeepseekV3Config(
            **common,
            intermediate_size=shape.expert_hidden,
            moe_intermediate_size=shape.expert_hidden,
            n_routed_experts=experts,
            n_shared_experts=0,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
            q_lora_rank=None,
            kv_lora_rank=head_dim * 2,
            qk_rope_head_dim=head_dim // 2,
            qk_nope_head_dim=head_dim // 2,
            v_head_dim=head_dim,
            num_mtp_layers=0,
        )
        return DeepseekV3ForCausalLM(cfg)

    return {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "deepseek_v3": deepseek_v3}


def _hf_implementations(model: nn.Module) -> dict[str, Any]:
    """Which expert and attention kernels transformers dispatches to for ``model`` (its defaults)."""
    config = getattr(model, "config", None)
    return {
        "experts_implementation": getattr(config, "_experts_implementation_internal", None),
        "attn_implementation": getattr(config, "_attn_implementation", None),
    }


PHASES = ("forward", "backward", "optimizer")
TARGET_OVER_BEST_HF = 1.15  # issue 18: the engine's throughput over the best Hugging Face model's, same shape


@dataclass
class Runner:
    """One model with its optimizer, ready to time training steps."""

    name: str
    experts: int
    model: nn.Module
    optimizer: Optimizer
    is_ours: bool
    times: list[tuple[float, float, float]]  # per timed step: forward, backward, optimizer (seconds)
    # Builds the model and its optimizer again from the same seed (the --fresh harness); None: never rebuilt.
    make: Callable[[], tuple[nn.Module, Optimizer]] | None = None
    # The forward (and loss) runs under CPU autocast to this dtype (--precision bf16); None: fp32.
    autocast: torch.dtype | None = None

    def rebuild(self) -> None:
        """A freshly built model and optimizer (same seed, so the same weights) in place of the current ones."""
        assert self.make is not None
        del self.model, self.optimizer  # freed first: the new ones may reuse the memory, as in a new run
        self.model, self.optimizer = self.make()

    def step(self, ids: torch.Tensor) -> tuple[float, float, float]:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        # As a training loop runs mixed precision (this engine's ``training.precision``, Hugging Face's Trainer
        # with ``bf16=True``): the forward and the loss under autocast, the backward and the step outside it.
        with torch.autocast("cpu", dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            # Ours takes input_ids positionally, Hugging Face by name. Ours as the engine's training step calls it:
            # no logits (``return_logits=False``: the fused head computes the loss and its gradients chunk by
            # chunk); Hugging Face's models build them, as their default kernels do.
            if self.is_ours:
                loss = self.model(ids, labels=ids, return_logits=False).loss
            else:
                loss = self.model(input_ids=ids, labels=ids).loss
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        self.optimizer.step()
        if self.is_ours:
            self.model.update_router_biases()  # type: ignore[operator]
        end = time.perf_counter()
        return forward - start, backward - forward, end - backward


def fused_adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Fused AdamW (one kernel for all parameters; on CPU since torch 2.4), the loop version otherwise.

    Every model gets it: it is what this engine trains with, and what Hugging Face's Trainer uses by default
    (``optim="adamw_torch_fused"`` since transformers 4.5x with torch >= 2.8), so the figures compare models.
    """
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=lr)


# ----------------------------------------------------------------------------------------------------------
# Where the time goes: a profiled step split by component
# ----------------------------------------------------------------------------------------------------------

COMPONENTS = ("attention", "norms", "experts", "head", "optimizer", "other")
_RANGE = "bench::"


def _component_of(module: nn.Module) -> str | None:
    """The component a module is, by its class name (this engine's and Hugging Face's modules alike)."""
    name = type(module).__name__
    if name.endswith("Attention"):
        return "attention"
    if "Norm" in name:
        return "norms"
    if "MoE" in name or "SparseMoe" in name or name.endswith(("FeedForward", "MLP")):
        return "experts"
    return None


def _final_norm(model: nn.Module) -> nn.Module:
    """The norm before the output head: ``model.norm`` (this engine) or ``model.model.norm`` (Hugging Face)."""
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None) if isinstance(inner, nn.Module) else None
    found = norm if isinstance(norm, nn.Module) else getattr(model, "norm", None)
    if not isinstance(found, nn.Module):
        raise ValueError(f"{type(model).__name__} has no final norm to start the head's range at")
    return found


@contextlib.contextmanager
def component_ranges(model: nn.Module) -> Iterator[None]:
    """Profiler ranges ``bench::<component>`` around the outermost attention, norm and feed-forward modules, and
    ``bench::head`` from the final norm's end to the model's end (output head and loss), while in the block."""
    stack: list[Any] = []
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def enter(name: str) -> None:
        rf = torch.profiler.record_function(_RANGE + name)
        rf.__enter__()
        stack.append(rf)

    def leave() -> None:
        stack.pop().__exit__(None, None, None)

    def outermost(module: nn.Module) -> Iterator[tuple[nn.Module, str]]:
        for child in module.children():
            component = _component_of(child)
            if component is not None:
                yield child, component
            else:
                yield from outermost(child)

    for module, component in outermost(model):
        handles.append(module.register_forward_pre_hook(lambda _m, _a, c=component: enter(c)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o: leave()))
    handles.append(_final_norm(model).register_forward_hook(lambda _m, _a, _o: enter("head"), prepend=False))
    handles.append(model.register_forward_hook(lambda _m, _a, _o: leave()))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while stack:
            leave()


def component_shares(runner: Runner, ids: torch.Tensor, steps: int = 3) -> dict[str, float]:
    """Median over ``steps`` separately profiled training steps of each component's share (renormalised to 1):
    a burst of load from other processes during one profiled step does not skew the split."""
    each = [_profiled_shares(runner, ids) for _ in range(steps)]
    medians = {name: statistics.median(shares[name] for shares in each) for name in COMPONENTS}
    whole = sum(medians.values()) or 1.0
    return {name: value / whole for name, value in medians.items()}


def _profiled_shares(runner: Runner, ids: torch.Tensor) -> dict[str, float]:
    """Fractions of one profiled training step's main-thread time per component (``COMPONENTS``).

    A forward operation belongs to the range it runs in; a backward one to the forward operation it differentiates
    (the profiler's sequence numbers link them); the optimizer's step and zero_grad to ``optimizer``; the rest
    (embedding, residual adds, gradient accumulation, the loss's own bookkeeping outside the head) to ``other``.
    """
    from torch.profiler import ProfilerActivity, profile

    with component_ranges(runner.model), profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(ids)
    events = prof.events()
    forward_of: dict[int, str] = {}
    totals = dict.fromkeys(COMPONENTS, 0.0)

    def ancestor(event: Any) -> Any:
        while event.cpu_parent is not None:
            event = event.cpu_parent
        return event

    def in_range(event: Any) -> str | None:
        while event is not None:
            if event.name.startswith(_RANGE):
                return str(event.name[len(_RANGE) :])
            event = event.cpu_parent
        return None

    for event in events:  # forward operations: sequence number -> component
        component = in_range(event)
        if component is not None and event.sequence_nr >= 0:
            forward_of.setdefault(event.sequence_nr, component)
    for event in events:
        if event.name.startswith(_RANGE):
            continue
        component = in_range(event)
        if component is None:
            top = ancestor(event)
            if top.name.startswith("autograd::engine::evaluate_function"):
                component = forward_of.get(top.sequence_nr, "other")
            elif top.name.startswith("Optimizer."):
                component = "optimizer"
            else:
                component = "other"
        totals[component] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {name: value / whole for name, value in totals.items()}


def component_flops_per_token(spec: Spec) -> dict[str, float]:
    """Training FLOPs per token of the shared shape's matmuls, by component (6 x parameters + attention's scores)."""
    m = spec.model
    parts = parameter_breakdown(spec)
    experts = parts["routed_experts"] * m.moe.top_k // max(1, m.moe.num_routed_experts)
    return {
        "attention": 6.0 * parts["attention"] + 6.0 * m.num_layers * spec.data.seq_len * m.hidden_size,
        "experts": 6.0 * (experts + parts["shared_experts"] + parts["router"] + parts["dense_ffn"]),
        "head": 6.0 * m.vocab_size * m.hidden_size,
    }


def _seeded_build(make_model: Callable[[], nn.Module]) -> tuple[nn.Module, Optimizer]:
    """``make_model()`` from seed 0 in train mode, with fused AdamW (every model alike)."""
    torch.manual_seed(0)
    model = make_model().train()
    return model, fused_adamw(model, 3e-4)


def _components_entry(
    shares: dict[str, float], step_s: float, spec: Spec, tokens: int, peak_gflops: float
) -> dict[str, dict[str, float | None]]:
    """Per component: its share of the profiled step, that share of the median step in ms, and the MFU of its
    nominal matmul FLOPs in that time (None for the components without matmuls)."""
    flops = component_flops_per_token(spec)
    out: dict[str, dict[str, float | None]] = {}
    for name, share in shares.items():
        seconds = share * step_s
        mfu = None
        if name in flops and seconds > 0:
            mfu = round(flops[name] * tokens / seconds / (peak_gflops * 1e9), 3)
        out[name] = {"share": round(share, 3), "ms": round(seconds * 1000, 1), "mfu": mfu}
    return out


# ----------------------------------------------------------------------------------------------------------
# The kernel floor: what the kernels that every model shares take alone at this shape
# ----------------------------------------------------------------------------------------------------------

FLOOR_PARTS = ("experts", "attention", "router", "head", "optimizer")


class KernelFloor:
    """The matmul-class kernels that every model of ``shape`` runs, each timed alone on random fp32 data.

    Per layer: the grouped expert matmul of both projections (``grouped_matmul``: forward and both gradients, the
    ``batch x seq_len x top_k`` routed rows split evenly over the experts), the attention's q, k, v and output
    projections (forward and both gradients) and SDPA's causal kernel (forward and backward), the router's
    projection; once: the output head's projection, and one fused AdamW step over tensors of
    ``parameter_shapes``. Every layer has its own tensors, as a model's layers do.

    Their sum is a floor under a training step of this shape built on these kernels: the norms, activations,
    routing and dispatch, rotary embedding, the loss's softmax and the framework come on top of it. A step minus
    the floor is the part that an engine shapes (``floor_comparison``).
    """

    def __init__(self, shape: Shape, experts: int, parameter_shapes: list[torch.Size]) -> None:
        gen = torch.Generator().manual_seed(1)

        def rand(*size: int, grad: bool = True) -> torch.Tensor:
            return (torch.randn(*size, generator=gen) * 0.02).requires_grad_(grad)

        tokens, width, hidden = shape.batch * shape.seq_len, shape.d_model, shape.expert_hidden
        head_dim = width // shape.heads
        rows = tokens * shape.top_k
        self.counts = torch.full((experts,), rows // experts, dtype=torch.int64)
        self.counts[: rows % experts] += 1
        self.layers = [
            {
                "rows": rand(rows, width),
                "activated": rand(rows, hidden),
                "w_in": rand(experts, width, 2 * hidden),
                "w_out": rand(experts, hidden, width),
                "x": rand(tokens, width),  # the inputs of the q/k/v, output and router projections
                "attended": rand(tokens, width),
                "normed": rand(tokens, width),
                "qkv": rand(3 * width, width),
                "o": rand(width, width),
                "router": rand(experts, width),
                "q": rand(shape.batch, shape.heads, shape.seq_len, head_dim),
                "k": rand(shape.batch, shape.heads, shape.seq_len, head_dim),
                "v": rand(shape.batch, shape.heads, shape.seq_len, head_dim),
            }
            for _ in range(shape.layers)
        ]
        self.head_x, self.head_w = rand(tokens, width), rand(shape.vocab, width)
        self.grads = {
            "expert_in": rand(rows, 2 * hidden, grad=False),
            "expert_out": rand(rows, width, grad=False),
            "qkv": rand(tokens, 3 * width, grad=False),
            "o": rand(tokens, width, grad=False),
            "router": rand(tokens, experts, grad=False),
            "attention": rand(shape.batch, shape.heads, shape.seq_len, head_dim, grad=False),
            "head": rand(tokens, shape.vocab, grad=False),
        }
        self.parameters = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in parameter_shapes)
        for p in self.parameters:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        self.optimizer = fused_adamw(self.parameters, 3e-4)
        self.times: list[dict[str, float]] = []

    def measure(self) -> dict[str, float]:
        """Seconds of each part (``FLOOR_PARTS``) for one training step's worth of calls."""
        g = self.grads
        seconds = dict.fromkeys(FLOOR_PARTS, 0.0)
        for layer in self.layers:
            start = time.perf_counter()
            grouped_matmul(layer["rows"], layer["w_in"], self.counts).backward(g["expert_in"])
            grouped_matmul(layer["activated"], layer["w_out"], self.counts).backward(g["expert_out"])
            experts = time.perf_counter()
            torch.nn.functional.linear(layer["x"], layer["qkv"]).backward(g["qkv"])
            torch.nn.functional.linear(layer["attended"], layer["o"]).backward(g["o"])
            attention_core = torch.nn.functional.scaled_dot_product_attention(
                layer["q"], layer["k"], layer["v"], is_causal=True
            )
            attention_core.backward(g["attention"])
            attention = time.perf_counter()
            torch.nn.functional.linear(layer["normed"], layer["router"]).backward(g["router"])
            router = time.perf_counter()
            seconds["experts"] += experts - start
            seconds["attention"] += attention - experts
            seconds["router"] += router - attention
        start = time.perf_counter()
        torch.nn.functional.linear(self.head_x, self.head_w).backward(g["head"])
        head = time.perf_counter()
        self.optimizer.step()
        seconds["head"] = head - start
        seconds["optimizer"] = time.perf_counter() - head
        for layer in self.layers:
            for tensor in layer.values():
                tensor.grad = None
        self.head_x.grad = self.head_w.grad = None
        return seconds


def floor_entry(floor: KernelFloor, stat: str) -> dict[str, float]:
    """Each part's ``stat`` ("median" or "min") over the timed rounds in ms, and ``total``: that statistic of the
    rounds' sums (not the sum of the parts' statistics)."""
    pick = statistics.median if stat == "median" else min
    entry = {part: round(pick(t[part] for t in floor.times) * 1000, 1) for part in FLOOR_PARTS}
    entry["total"] = round(pick(sum(t.values()) for t in floor.times) * 1000, 1)
    return entry


def floor_comparison(best_hf_ms: float, ours_ms: float, floor_ms: float, target: float) -> dict[str, float]:
    """What a step-time target asks of the part of ours' step above the kernel floor.

    ``*_above_floor_ms``: ours' and the best Hugging Face model's steps minus the floor (all in ms);
    ``ours_above_floor_for_target_ms``: what ours' part may take for ``best_hf_ms / ours_ms >= target``;
    ``ours_above_floor_cut_needed``: the fraction of ours' part that must go for that (0 where the target is met);
    ``ours_over_best_hf_if_nothing_above_floor``: the ratio if ours' part took no time, the ceiling on these
    kernels.
    """
    allowed = best_hf_ms / target - floor_ms
    ours_above = ours_ms - floor_ms
    cut = 1.0 - allowed / ours_above if ours_above > 0 else 0.0
    return {
        "ours_above_floor_ms": round(ours_above, 1),
        "best_hf_above_floor_ms": round(best_hf_ms - floor_ms, 1),
        "ours_above_floor_for_target_ms": round(allowed, 1),
        "ours_above_floor_cut_needed": round(max(0.0, cut), 3),
        "ours_over_best_hf_if_nothing_above_floor": round(best_hf_ms / floor_ms, 3),
    }


def cpu_device_label(threads: int) -> str:
    """The ``device`` every CPU bench report states: ``cpu (<processor>), <threads> threads``, the processor's name
    where the OS gives one (``platform.processor()``), else the machine's architecture (``x86_64``)."""
    return f"cpu ({platform.processor() or platform.machine()}), {threads} threads"


def measure_matmul_peak(size: int, reps: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Best matmul rate (GFLOP/s) of ``reps`` square ``size`` products in ``dtype`` on ``device``, now (on a CPU, on
    this process' threads).

    One untimed product first: oneDNN builds its kernel for a shape and dtype on the first call (bf16's notably), and
    CUDA loads cuBLAS and picks its kernel. On CUDA a launch returns before the product is done, so the device is
    synchronised before each clock read: the time is the product's, not its launch's.
    """
    cuda = torch.device(device).type == "cuda"

    def finished() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    torch.mm(a, b, out=out)
    finished()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        finished()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _variant(spec: Spec, model: dict[str, Any] | None = None, training: dict[str, Any] | None = None) -> Spec:
    raw = spec.model_dump(mode="json")
    raw["model"].update(model or {})
    raw["training"].update(training or {})
    return Spec.model_validate(raw)


def deepseek_variants(shape: Shape, experts: int = 8) -> dict[str, Spec]:
    """The engine's default at ``shape`` and its DeepSeek-V3 options, one change each. MLA is configured as
    the Hugging Face DeepSeek-V3 model of the main section (no query compression, latent 2 x head_dim,
    rotary and non-rotary halves of a head, values a head wide)."""
    base = our_spec(shape, experts)
    head_dim = shape.d_model // shape.heads
    mla = {
        "q_lora_rank": 0,
        "kv_lora_rank": 2 * head_dim,
        "qk_rope_head_dim": head_dim // 2,
        "qk_nope_head_dim": head_dim // 2,
        "v_head_dim": head_dim,
    }
    return {
        "default": base,  # multi-head attention, no MTP, AdamW
        "attention_gqa": _variant(base, {"attention": "gqa", "num_kv_heads": max(1, shape.heads // 4)}),
        "attention_mla": _variant(base, {"attention": "mla", "mla": mla}),
        "mtp_depth_1": _variant(base, {"mtp_depth": 1}),
        **{
            f"optimizer_{name}": _variant(base, training={"optimizer": {"name": name}})
            for name in ("adafactor", "sgd", "muon")
        },
    }


def _state_bytes(optimizer: Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for key, v in state.items()
        if key != "step" and isinstance(v, torch.Tensor)
    )


def _measured_kv_bytes_per_token(spec: Spec, tokens: int = 16) -> float:
    model = build_model(spec).eval()
    caches = [KVCache() for _ in model.layers]
    with torch.no_grad():
        model.hidden_states(torch.zeros(1, tokens, dtype=torch.long), caches)
    return sum(c.nbytes for c in caches) / tokens


def deepseek_section(shape: Shape, rounds: int, warmup: int, ids: torch.Tensor) -> dict[str, Any]:
    """Time the DeepSeek-V3 options (``deepseek_variants``) in interleaved rounds; medians per variant."""
    specs = deepseek_variants(shape)
    runners: list[Runner] = []
    for name, spec in specs.items():
        torch.manual_seed(0)
        model = build_model(spec).train()
        runners.append(Runner(name, 8, model, build_optimizer(model, spec, torch.device("cpu")), True, []))
    for r in range(warmup + rounds):
        shift = r % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            elapsed = runner.step(ids)
            if r >= warmup:
                runner.times.append(elapsed)
        print(f"deepseek_v3 round {r + 1}/{warmup + rounds} done", file=sys.stderr, flush=True)
    tokens = ids.numel()
    out: dict[str, Any] = {}
    for runner in runners:
        spec = specs[runner.name]
        step_s = statistics.median(sum(t) for t in runner.times)
        entry: dict[str, Any] = {
            "tokens_per_s": round(tokens / step_s, 1),
            "step_ms_median": round(step_s * 1000, 1),
            "step_ms_min": round(min(sum(t) for t in runner.times) * 1000, 1),
            "phase_ms_median": {
                phase: round(statistics.median(t[i] for t in runner.times) * 1000, 1) for i, phase in enumerate(PHASES)
            },
            "parameters": sum(p.numel() for p in runner.model.parameters()),
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(spec),
            "kv_cache_bytes_per_token_measured": _measured_kv_bytes_per_token(spec),
            "optimizer": spec.training.optimizer.name,
            "optimizer_state_bytes": _state_bytes(runner.optimizer),
            "optimizer_state_bytes_predicted": optimizer_state_elements(spec) * 4,
        }
        out[runner.name] = entry
    default = out["default"]["step_ms_median"]
    for entry in out.values():
        entry["step_over_default"] = round(entry["step_ms_median"] / default, 3)
    return out


DEEPSEEK_NOTES = [
    "deepseek_v3: this engine at the shape above with 8 experts (untied, no shared experts, all layers MoE, "
    "aux-free), forward + backward + optimizer step, fp32; 'default' is multi-head attention, no MTP, fused "
    "AdamW; every other variant changes one thing (gqa: heads/4 key/value heads; mla: kv_lora_rank 2 x head_dim, "
    "rotary and non-rotary halves of a head, values a head wide, no query compression; mtp_depth_1; each "
    "optimizer with its spec defaults)",
    "kv_cache_bytes_per_token: fp32, all layers, as the estimator predicts it and as a real cache holds it",
    "optimizer_state_bytes: the state tensors the optimizer holds after the timed steps (step counters aside), "
    "and the estimator's prediction",
]


WALL_TIME_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (model changes, training changes) to the tiny demo template
    "adamw": ({}, {}),
    # Moonlight's learning-rate matching (adjust_lr match_rms_adamw) lets AdamW's rate and decay carry over.
    "muon": (
        {},
        {
            "optimizer": {
                "name": "muon",
                "lr": 0.002,
                "weight_decay": 0.01,
                "adamw_lr": 0.002,
                "adamw_weight_decay": 0.01,
            }
        },
    ),
    "adamw_mtp_depth_1": ({"mtp_depth": 1}, {}),
}


def _step_seconds(sink: MemorySink) -> list[float]:
    """Every trained step's time (log_interval 1: one point per step; evaluations and checkpoints excluded)."""
    return [seconds for _, seconds in sink.series("step_time_s")]


def write_demo_corpus(path: Path, corpus_examples: int | None = None) -> Path:
    """The built-in ``python-docs`` corpus at ``path`` (JSON lines); ``corpus_examples`` (``--quick``): only the
    first that many help topics, whose making and tokenizing is quicker than the whole corpus's."""
    from builder.datasets.demo import build_corpus

    if corpus_examples is None:
        build_corpus(path)
    else:
        topics = pydoc_data.topics.topics
        rows = [{"text": topics[name].strip()} for name in sorted(topics)[:corpus_examples]]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@dataclass
class SameWallTimeRun:
    """What ``train_same_wall_time`` trained: each variant's final spec (its own ``max_steps``), its metrics,
    its calibrated step seconds, the budget in seconds and the calibration steps actually used."""

    specs: dict[str, Spec]
    sinks: dict[str, MemorySink]
    calibrated: dict[str, float]
    budget_s: float
    calibration_steps: int


class SameWallTimeError(RuntimeError):
    """A model of a same-wall-time comparison ended other than stopped, completed or early-stopped."""


def train_same_wall_time(
    specs: dict[str, Spec],
    prepared: PreparedData,
    work: Path,
    budget: Callable[[dict[str, float]], float],
    calibration_steps: int,
    chunk: int,
    evaluations: int = 1,
) -> SameWallTimeRun:
    """Train every named spec (``log_interval`` 1) for the same training time, interleaved.

    Every spec first trains ``calibration_steps`` steps (capped to the first spec's warmup, where the rate does
    not depend on ``max_steps``), in round-robin thirds so that a burst of load from other processes does not
    fall on one of them; the median step time is each one's calibrated step. ``budget(calibrated)`` gives the
    budget in seconds; each spec's ``max_steps`` is then set so that it trains for the budget at its own
    calibrated step (its schedule decays over the whole budget; a warmup longer than half of it is cut to half),
    and all train on in round-robin chunks of ``chunk`` steps (``train`` resumes from its checkpoint under
    ``work / name``). Each evaluates ``evaluations`` times at equal step intervals, the last at its last step
    (evaluation time is not step time). A model that stops early ends its curve there; one whose run fails
    (or is preempted) raises ``SameWallTimeError`` naming it, its status, step and reason.
    """
    first = next(iter(specs.values()))
    calibration_steps = max(1, min(calibration_steps, first.training.schedule.warmup_steps, first.training.max_steps))
    sinks = {name: MemorySink() for name in specs}

    ended: set[str] = set()

    def train_to(name: str, spec: Spec, stop: int) -> int:
        """Train ``name`` up to step ``stop``; the step it is now at. A model that completes or stops early is
        added to ``ended``."""
        result = train(spec, prepared, work / name, sinks[name], device="cpu", stop_after_step=stop)
        if result.status == "stopped":
            return result.step
        if result.status in ("completed", "early_stopped"):
            # An early stop ends this model's run: its curve stops there, the others train on.
            ended.add(name)
            return result.step
        # A failed run (an anomaly it could not roll back past) or a preempted one would resume from the same
        # checkpoint and fail again at every chunk; comparing its curve would compare nothing.
        raise SameWallTimeError(f"{name} ended {result.status} at step {result.step}: {result.reason}")

    at = dict.fromkeys(specs, 0)
    for stop in sorted({max(1, calibration_steps * k // 3) for k in (1, 2, 3)}):
        for name, spec in specs.items():
            if name not in ended:
                at[name] = train_to(name, spec, stop)
    calibrated = {name: statistics.median(_step_seconds(sink)) for name, sink in sinks.items()}
    budget_s = budget(calibrated)
    for name, spec in list(specs.items()):
        own_steps = max(calibration_steps + 1, round(budget_s / calibrated[name]))
        interval = max(1, -(-own_steps // max(1, evaluations)))
        schedule = spec.training.schedule.model_dump()
        # A budget shorter than the warmup (a machine slowed by other work) still trains and decays.
        schedule["warmup_steps"] = min(schedule["warmup_steps"], own_steps // 2)
        changes = {"max_steps": own_steps, "eval_interval": interval, "schedule": schedule}
        specs[name] = _variant(spec, training=changes)
    while any(name not in ended and at[name] < spec.training.max_steps for name, spec in specs.items()):
        for name, spec in specs.items():
            if name not in ended and at[name] < spec.training.max_steps:
                at[name] = train_to(name, spec, min(at[name] + chunk, spec.training.max_steps))
        print(f"same_wall_time: {at}", file=sys.stderr, flush=True)
    return SameWallTimeRun(dict(specs), sinks, calibrated, budget_s, calibration_steps)


def tiny_demo_same_wall_time(
    work: Path, budget_steps: int, calibration_steps: int, chunk: int, corpus_examples: int | None = None
) -> dict[str, Any]:
    """Validation loss of the tiny demo template (``tiny-cpu-demo`` on the built-in ``python-docs`` corpus) after
    the same training time with AdamW (the template), Muon, and AdamW with one MTP module.

    The budget is the template's AdamW run cut to ``budget_steps`` steps. Every variant first trains
    ``calibration_steps`` steps (inside the warmup, where the rate does not depend on ``max_steps``; in
    round-robin thirds; the median step counts); each
    variant's ``max_steps`` is then set so that it trains for the budget at its own calibrated step time (the
    schedule decays over the whole budget), and the variants train on in round-robin chunks of ``chunk`` steps
    (``train`` resumes from its checkpoint), so load from other processes hits them alike. ``val_loss`` is the
    next-token loss on the template's validation batches at each variant's last step (MTP's extra loss is not
    in it); ``train_seconds`` is the measured step time summed (evaluations and checkpoints excluded).
    ``corpus_examples`` (``--quick``): only the first that many help topics instead of the whole corpus, whose
    making and tokenizing would take longer than the smoke test's training.
    """
    from builder.configs.presets import PRESETS

    corpus = write_demo_corpus(work / "python-docs.jsonl", corpus_examples)
    base = PRESETS["tiny-cpu-demo"].spec
    steps = min(budget_steps, base.training.max_steps)
    specs: dict[str, Spec] = {}
    for name, (model, training) in WALL_TIME_VARIANTS.items():
        # Evaluate only at the end of each run (and at the calibration point): the same batches for all.
        schedule = base.training.schedule.model_dump()
        schedule["warmup_steps"] = min(schedule["warmup_steps"], steps // 2)  # (a --quick budget is short)
        changes = {
            "max_steps": steps,
            "schedule": schedule,
            "checkpoint_interval": 10_000_000,
            "eval_interval": 10_000_000,
            **training,
        }
        specs[name] = _variant(base, model, changes)
    prepared = prepare(specs["adamw"], corpus, work / "prepared")
    run = train_same_wall_time(
        specs, prepared, work, lambda calibrated: steps * calibrated["adamw"], calibration_steps, chunk
    )
    specs, sinks, calibrated = run.specs, run.sinks, run.calibrated
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        sink = sinks[name]
        seconds = _step_seconds(sink)
        val = sink.series("val_loss")
        mtp = sink.series("mtp_loss")
        out[name] = {
            "optimizer": spec.training.optimizer.name,
            "mtp_depth": spec.model.mtp_depth,
            "steps": spec.training.max_steps,
            "calibrated_step_ms": round(calibrated[name] * 1000, 1),
            "step_ms_median": round(statistics.median(seconds) * 1000, 1),
            "train_seconds": round(sum(seconds), 1),
            "val_loss": round(val[-1][1], 4),
            "val_loss_step": val[-1][0],
            "train_loss_last_50_mean": round(statistics.fmean(v for _, v in sink.series("loss")[-50:]), 4),
            "mtp_loss_last_50_mean": round(statistics.fmean(v for _, v in mtp[-50:]), 4) if mtp else None,
        }
    return {
        "template": "tiny-cpu-demo",
        "dataset": "python-docs",
        "budget_seconds": round(run.budget_s, 1),
        "budget": f"{steps} AdamW steps at its calibrated step time",
        "calibration_steps": run.calibration_steps,
        "chunk_steps": chunk,
        "load_average_1min_end": round(os.getloadavg()[0], 2),
        "variants": out,
    }


WALL_TIME_NOTES = [
    "same_wall_time: the tiny demo template (2 layers, d_model 128, 8 routed experts top-2 scaled by 4 + 1 shared, "
    "vocab 2048 BPE, 8 x 128 tokens, cosine schedule) on the built-in python-docs corpus; each variant's max_steps "
    "fills the budget at its calibrated step time, variants interleaved in chunks; muon: lr 0.002 and weight decay "
    "0.01 for both parts (Moonlight's match_rms_adamw), mtp: one module, loss weight 0.3; val_loss excludes the MTP "
    "loss",
    "this machine is shared with other work (2 cores, several agents): step times, hence steps within the budget, "
    "vary run to run; train_seconds says how much time each variant actually trained",
]


def training_flops_per_token(spec: Spec) -> float:
    """Model FLOPs per trained token: 6 x active matmul parameters + causal attention scores and values.

    Active matmul parameters exclude the input embedding (a lookup) and include the output head; the
    attention term is ``6 * layers * seq_len * d_model`` (QK^T and AV, forward 2x and backward 4x, halved
    for the causal mask).
    """
    m = spec.model
    active = parameter_breakdown(spec)["active_matmul"]
    return 6.0 * active + 6.0 * m.num_layers * spec.data.seq_len * m.hidden_size


def add_thp_option(parser: argparse.ArgumentParser) -> None:
    """``--no-thp``, for every benchmark that asks for transparent huge pages with ``ask_for_huge_pages``."""
    parser.add_argument(
        "--no-thp", action="store_true", help="do not ask torch for transparent huge pages (THP_MEM_ALLOC_ENABLE)"
    )


def ask_for_huge_pages(args: argparse.Namespace) -> None:
    """Ask torch for transparent huge pages unless ``args.no_thp`` (see ``add_thp_option``); call it before the
    first tensor of the measured work is allocated."""
    if not args.no_thp:
        # torch reads this once, at its first large CPU allocation: it aligns allocations of 2 MB and more to
        # huge pages and madvises them. Fresh gradient and logit buffers (tens of MB each step) then cost a
        # few hundred page faults instead of tens of thousands; every model in this process benefits alike.
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9, quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2, quick 1)")
    parser.add_argument("--experts", default=None, help="comma-separated expert counts (default 8,64)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a figure")
    parser.add_argument("--no-hf", action="store_true", help="run this engine only")
    parser.add_argument("--no-deepseek", action="store_true", help="skip the DeepSeek-V3 options section")
    parser.add_argument("--deepseek-only", action="store_true", help="run only the DeepSeek-V3 options section")
    parser.add_argument(
        "--no-wall-time",
        action="store_true",
        help="skip the DeepSeek-V3 section's same-wall-time training of the tiny demo template (minutes)",
    )
    parser.add_argument(
        "--wall-time-only", action="store_true", help="run only the same-wall-time training of the tiny demo template"
    )
    parser.add_argument(
        "--no-keep-freed",
        action="store_true",
        help="let glibc unmap freed large buffers (how training ran before workers.engine.allocator)",
    )
    add_thp_option(parser)
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: every model's forward and loss under CPU autocast to bf16 (ours as training.precision bf16 "
        "runs it), the matmul peak in bf16",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="build every model afresh (same seed) before each timed step, after one untimed step of its own",
    )
    return parser.parse_args(argv)


def _anon_huge_pages_kib() -> int | None:
    """Transparent huge pages this process holds (Linux), to show whether THP allocation took effect."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ask_for_huge_pages(args)
    shape = QUICK if args.quick else FULL
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 9)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    expert_counts = [int(e) for e in (args.experts or ("4,8" if args.quick else "8,64")).split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    notes: list[str] = []

    hf_version: str | None = None
    if not args.no_hf:
        try:
            import transformers

            hf_version = transformers.__version__
        except ImportError:
            notes.append("transformers is not installed: Hugging Face models skipped (pip install .[bench])")
    else:
        notes.append("Hugging Face models skipped (--no-hf)")

    # Freed memory stays in the process, as in a training run (workers.engine.train.train): for every model
    # alike, so the figures are the engine's, not glibc's unmapping and re-faulting of large buffers.
    keep = contextlib.nullcontext(False) if args.no_keep_freed else keep_freed_memory()
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), generator=torch.Generator().manual_seed(0))
    device = cpu_device_label(args.threads)
    # budget, calibration and chunk steps (and the corpus cut for --quick)
    wall_time_args = (40, 10, 15, 40) if args.quick else (700, 30, 50, None)
    if args.wall_time_only:
        with tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            same = tiny_demo_same_wall_time(Path(work), *wall_time_args)
        result = {
            "bench": "engine_tiny_demo_same_wall_time",
            "quick": args.quick,
            "device": device,
            "torch": torch.__version__,
            "seconds": round(time.perf_counter() - started, 1),
            "same_wall_time": same,
            "notes": WALL_TIME_NOTES,
        }
        print(json.dumps(result, indent=2))
        return 0
    same_wall_time: dict[str, Any] | None = None
    if args.deepseek_only:
        with keep:
            started = time.perf_counter()
            section = deepseek_section(shape, rounds, warmup, ids)
        if not args.no_wall_time:
            with tempfile.TemporaryDirectory() as work:
                same_wall_time = tiny_demo_same_wall_time(Path(work), *wall_time_args)
        only = {
            "bench": "engine_deepseek_v3_options",
            "quick": args.quick,
            "device": device,
            "torch": torch.__version__,
            "shape": shape.__dict__,
            "rounds": rounds,
            "warmup": warmup,
            "seconds": round(time.perf_counter() - started, 1),
            "deepseek_v3": section,
            "same_wall_time": same_wall_time,
            "notes": DEEPSEEK_NOTES + (WALL_TIME_NOTES if same_wall_time else []),
        }
        print(json.dumps(only, indent=2))
        return 0
    hf_setup: dict[str, dict[str, Any]] = {}
    deepseek: dict[str, Any] | None = None
    low_precision = torch.bfloat16 if args.precision == "bf16" else None
    with keep as kept_freed:
        runners: list[Runner] = []
        for experts in expert_counts:
            makers: dict[str, Callable[[], nn.Module]] = {
                "ours": functools.partial(build_model, our_spec(shape, experts))
            }
            if hf_version is not None:
                makers.update(_hf_models(shape, experts))
            for name, make_model in makers.items():
                make = functools.partial(_seeded_build, make_model)
                model, optimizer = make()
                runners.append(Runner(name, experts, model, optimizer, name == "ours", [], make, low_precision))
                if name != "ours":
                    hf_setup.setdefault(name, _hf_implementations(model))
        # The floor is fp32's: grouped_mm is not autocast-aware, and every model casts its own way under bf16.
        floors: dict[int, KernelFloor] = {}
        if low_precision is None:
            for runner in runners:
                if runner.is_ours:
                    shapes = [p.shape for p in runner.model.parameters()]
                    floors[runner.experts] = KernelFloor(shape, runner.experts, shapes)

        huge_kib = _anon_huge_pages_kib()
        peak_size = 256 if args.quick else 1024
        peaks: list[float] = []
        started = time.perf_counter()
        load_start = round(os.getloadavg()[0], 2)
        for r in range(warmup + rounds):
            timed = r >= warmup
            peak = measure_matmul_peak(peak_size, 5, low_precision or torch.float32)
            if timed:
                peaks.append(peak)
            # Rotate the order each round so that no model always follows the same neighbour.
            shift = r % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                if args.fresh:
                    runner.rebuild()
                    runner.step(ids)  # the first step of a new model allocates its gradients and optimizer state
                elapsed = runner.step(ids)
                if timed:
                    runner.times.append(elapsed)
            for floor in floors.values():
                parts = floor.measure()
                if timed:
                    floor.times.append(parts)
            print(f"round {r + 1}/{warmup + rounds} done", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - started
        load_end = round(os.getloadavg()[0], 2)
        # Where the time goes, profiled after the timed rounds (the profiler slows small operations, so only the
        # shares are taken from it and applied to each model's median step).
        shares = {(runner.experts, runner.name): component_shares(runner, ids) for runner in runners}
        if not args.no_deepseek:
            deepseek = deepseek_section(shape, rounds, warmup, ids)
    if not args.no_deepseek and not args.no_wall_time:
        with tempfile.TemporaryDirectory() as work:
            same_wall_time = tiny_demo_same_wall_time(Path(work), *wall_time_args)

    tokens = shape.batch * shape.seq_len
    peak_gflops = statistics.median(peaks)
    results: dict[str, dict[str, Any]] = {}
    for runner in runners:
        totals = [sum(t) for t in runner.times]
        step_s = statistics.median(totals)
        flops = training_flops_per_token(our_spec(shape, runner.experts)) * tokens
        results.setdefault(str(runner.experts), {})[runner.name] = {
            "tokens_per_s": round(tokens / step_s, 1),
            "step_ms_median": round(step_s * 1000, 1),
            "step_ms_min": round(min(totals) * 1000, 1),
            "step_ms_max": round(max(totals) * 1000, 1),
            "step_ms_all": [round(t * 1000) for t in totals],
            "phase_ms_median": {
                phase: round(statistics.median(t[i] for t in runner.times) * 1000, 1) for i, phase in enumerate(PHASES)
            },
            "phase_ms_min": {phase: round(min(t[i] for t in runner.times) * 1000, 1) for i, phase in enumerate(PHASES)},
            "parameters": sum(p.numel() for p in runner.model.parameters()),
            "mfu": round(flops / step_s / (peak_gflops * 1e9), 3),
            "components": _components_entry(
                shares[(runner.experts, runner.name)], step_s, our_spec(shape, runner.experts), tokens, peak_gflops
            ),
        }

    # Issue 18's target: ours >= 1.15x the best Hugging Face model at every expert count, on medians, in this
    # harness and in the fresh-model one without THP (make bench runs both). Minima (each model's least disturbed
    # step) are given beside them. The step-time growth from the fewest to the most experts is reported, not judged.
    lo, hi = min(expert_counts), max(expert_counts)
    kernel_floor = {
        str(experts): {stat: floor_entry(floor, stat) for stat in ("median", "min")}
        for experts, floor in floors.items()
    }
    comparison: dict[str, Any] = {}
    scaling: dict[str, Any] = {}
    for stat in ("median", "min"):
        for experts in expert_counts:
            group = results[str(experts)]
            step = {name: entry[f"step_ms_{stat}"] for name, entry in group.items()}
            hf = {name: ms for name, ms in step.items() if not name.startswith("ours")}
            if not hf:
                continue
            best = min(hf, key=lambda name: hf[name])
            ratio = hf[best] / step["ours"]  # a throughput ratio: same tokens per step
            entry = comparison.setdefault(str(experts), {"target": TARGET_OVER_BEST_HF})
            entry[stat] = {
                "best_hf": best,
                "ours_over_best_hf": round(ratio, 3),
                "met": ratio >= TARGET_OVER_BEST_HF,
            }
            if str(experts) in kernel_floor:
                floor_ms = kernel_floor[str(experts)][stat]["total"]
                entry[stat]["kernel_floor"] = floor_comparison(hf[best], step["ours"], floor_ms, TARGET_OVER_BEST_HF)
        if hi != lo:
            ours_hi, ours_lo = results[str(hi)]["ours"], results[str(lo)]["ours"]
            ph_hi, ph_lo = ours_hi[f"phase_ms_{stat}"], ours_lo[f"phase_ms_{stat}"]
            scaling[stat] = {
                f"ours_step_{hi}_over_{lo}": round(ours_hi[f"step_ms_{stat}"] / ours_lo[f"step_ms_{stat}"], 3),
                f"ours_forward_backward_{hi}_over_{lo}": round(
                    (ph_hi["forward"] + ph_hi["backward"]) / (ph_lo["forward"] + ph_lo["backward"]), 3
                ),
            }

    notes += [
        f"forward + backward + AdamW step on one random batch (labels = inputs), {args.precision}, train mode; "
        "phase_ms_median: forward (with zero_grad), backward, optimizer (with ours' router-bias update)",
        "every model: fused AdamW (torch.optim.AdamW(fused=True)), as this engine trains and as Hugging Face's "
        "Trainer does by default (optim=adamw_torch_fused); hugging_face_setup: the expert and attention "
        "implementations transformers chose for each model",
        "all models: untied embeddings, no shared experts (ours num_shared_experts=0, DeepSeek-V3 "
        "n_shared_experts=0), every layer MoE, top-k routing, no aux loss computed (ours: aux_free bias "
        "update after each step; HF: output_router_logits=False)",
        "DeepSeek-V3 uses multi-head latent attention: q_lora_rank=None, kv_lora_rank=2*head_dim, "
        "qk_rope=qk_nope=head_dim/2, v_head_dim=head_dim; n_group=topk_group=1, no MTP layers",
        "mfu = nominal model FLOPs of the shared shape (6 x active matmul params + causal attention) per "
        f"second over the median {args.precision} matmul peak measured in the same rounds",
        "precision bf16: every model's forward and loss under torch.autocast('cpu', bfloat16), parameters, "
        "gradients and AdamW state in fp32 (as this engine's training.precision bf16 and Hugging Face's Trainer "
        "with bf16=True run); fp32: no autocast",
        "components: one profiled step per model split into attention, norms, experts (router, dispatch and "
        "expert matmuls; the outermost MoE/MLP module), head (output projection and loss: after the final norm), "
        "optimizer (step and zero_grad) and other (embedding, residuals, gradient accumulation), the median "
        "share over 3 separately profiled steps; a backward "
        "operation counts for the forward operation it differentiates; ms = share x the median step; mfu = the "
        "component's nominal matmul FLOPs (the shared shape) in that time over the measured peak",
        "kernel_floor_ms (fp32 runs): the kernels every model of this shape runs, each timed alone on random data "
        "in every round: per layer the grouped expert matmuls of both projections (forward and both gradients, "
        "the routed rows split evenly), the attention's q/k/v/o projections and SDPA's causal kernel (forward and "
        "backward), the router's projection; the output head's projection; one fused AdamW step over ours' "
        "parameter shapes; built once, also in the fresh harness. Everything else (norms, activations, routing "
        "and dispatch, rotary embedding, the loss's softmax, the framework) comes on top; "
        "comparison.*.kernel_floor: the part of each step above the floor, what the target allows ours' part, the "
        "fraction of it that must go (0: met) and the ratio if ours' part took no time",
        "harness 'persistent': each model built once, stepped in every round; 'fresh' (--fresh): rebuilt from the "
        "same seed before each timed step, after one untimed step of its own (new parameter, gradient and "
        "optimizer buffers every time, as at the start of a run)",
        "this machine is shared with other work (see load_average_1min; 2 cores): steps hit by a burst of "
        "load are slower by up to 10x, so minima are given beside medians; compare within one run",
    ]
    report = {
        "bench": "engine_training_step",
        "quick": args.quick,
        "device": device,
        "torch": torch.__version__,
        "transformers": hf_version,
        "hugging_face_setup": hf_setup,
        "shape": shape.__dict__,
        "rounds": rounds,
        "warmup": warmup,
        "harness": "fresh" if args.fresh else "persistent",
        "precision": args.precision,
        "seconds": round(seconds, 1),
        "load_average_1min": {"start": load_start, "end": load_end},
        "allocator": {
            "keep_freed_memory": kept_freed,
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "anon_huge_pages_mib_after_build": None if huge_kib is None else round(huge_kib / 1024),
        },
        f"peak_{args.precision}_matmul_gflops": {
            "median": round(peak_gflops, 1),
            "min": round(min(peaks), 1),
            "max": round(max(peaks), 1),
            "size": peak_size,
        },
        "results": results,
        "kernel_floor_ms": kernel_floor,
        "comparison": comparison,
        "scaling": scaling,
        "notes": notes,
    }
    if deepseek is not None:
        report["deepseek_v3"] = {
            "results": deepseek,
            "same_wall_time": same_wall_time,
            "notes": DEEPSEEK_NOTES + (WALL_TIME_NOTES if same_wall_time else []),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
