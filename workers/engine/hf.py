"""Hugging Face format: a trained model out as a ``from_pretrained`` folder, and such a folder in as a starting point.

Export (``export_hf``): ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``generation_config.json``) that transformers loads as one stock MoE family. The spec
decides the family (``hf_family``):

==============  ==========================  ==========================================================
family          class                       the engine's specs it expresses
==============  ==========================  ==========================================================
``deepseek_v3`` ``DeepseekV3ForCausalLM``   attention ``mla``, sigmoid scoring (group-limited or not)
``deepseek_v2`` ``DeepseekV2ForCausalLM``   attention ``mla``, softmax scoring without a selection bias
                                            (group-limited or not)
``glm4_moe``    ``Glm4MoeForCausalLM``      attention ``mha``/``gqa``, sigmoid scoring (DeepSeek-V3's router
                                            with standard attention)
``qwen2_moe``   ``Qwen2MoeForCausalLM``     attention ``mha``/``gqa``, softmax scoring without a selection bias
                                            and without groups
==============  ==========================  ==========================================================

The choice is ``workers.engine.hf_families`` (no torch: the lint rules ask it too). Every family needs SwiGLU,
RMSNorm and a causal LM. A spec no family expresses raises ``NotExpressible`` naming the
field that prevents it (``model.moe.balancing`` for softmax scoring with the aux-free bias, for example: the
engine then selects experts by ``softmax + bias``, which no stock softmax router has). Mixtral and Qwen3-MoE are not
targets: Mixtral always renormalises the top-k softmax weights (the engine keeps them as they are) and Qwen3-MoE
always RMS-normalises queries and keys per head (the engine does not).

What the conversion does besides renaming (each exact, or exact up to float rounding, and undone on import so that
export → import → export writes the same bytes):

- ``router_temperature`` is folded into the router weight (``x W^T / t = x (W / t)^T``);
- rotary encoding stays rotate-half (``rope_interleave: false`` for DeepSeek-V3), the engine's layout; DeepSeek-V2
  rotates interleaved pairs only, so the rotary rows of its query and latent projections are permuted into pairs;
- ``qwen2_moe``: its shared expert is gated by ``sigmoid(x · g)``; ``g = 0`` gives exactly ½, so the shared expert's
  down projection is written doubled (exact in binary floating point); ``routed_scaling_factor`` is folded into the
  routed experts' down projections; a model without shared experts gets a zero-width one;
- routed experts are written one tensor per expert and projection (the hub's layout, which transformers ≥ 5 fuses
  on load and older versions read as is).

Multi-token prediction modules are not exported: transformers does not run them (``num_nextn_predict_layers: 0``).

Import (``read_hf_folder`` + ``spec_from_hf_config`` + ``load_hf_weights``): the reverse, for a folder of one of the
four families, with the ``model`` section of a spec derived from ``config.json``. Anything the engine cannot
represent is refused by name (``HFImportError.field`` is the ``config.json`` key or tensor name): attention biases,
per-head query/key norms, partial rotary encoding, rope scaling, a non-zero Qwen shared-expert gate, an activation
other than SiLU. DeepSeek's interleaved rotary layout (``rope_interleave: true``, as the published checkpoints use)
is converted to rotate-half by permuting the rotary rows of the query and key projections. Only JSON and
safetensors are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from workers.engine.hf_families import (  # noqa: F401  (re-exported: the names callers know)
    ARCHITECTURES,
    DEEPSEEK_LATENT_NORM_EPS,
    NotExpressible,
    hf_family,
)
from workers.engine.spec import ModelSpec, Spec

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_SAFETENSORS_METADATA = {"format": "pt"}


class HFImportError(ValueError):
    """A folder that cannot become a starting point; ``field`` names the ``config.json`` key, tensor or file."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokenizer's special tokens (None where it has none)."""

    bos: int | None = None
    eos: int | None = None
    pad: int | None = None


def hf_config(model: ModelSpec, specials: SpecialTokens = SpecialTokens()) -> dict[str, Any]:
    """The ``config.json`` of ``model`` in its family (``hf_family``)."""
    family = hf_family(model)
    moe = model.moe
    grouped = moe.n_group > 1 and moe.topk_group < moe.n_group
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "initializer_range": model.init_std,
        "rms_norm_eps": model.norm_eps,
        "tie_word_embeddings": model.tie_embeddings,
        "rope_theta": model.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "attention_dropout": model.attention_dropout,
        "attention_bias": False,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_hidden_size,
        "intermediate_size": moe.resolved_dense_hidden_size,
        "bos_token_id": specials.bos,
        "eos_token_id": specials.eos,
        "pad_token_id": specials.pad,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if family in ("deepseek_v3", "glm4_moe"):
        config.update(
            n_routed_experts=moe.num_routed_experts,
            n_shared_experts=moe.num_shared_experts,
            n_group=moe.n_group if grouped else 1,
            topk_group=moe.topk_group if grouped else 1,
            routed_scaling_factor=moe.routed_scaling_factor,
            norm_topk_prob=True,
            first_k_dense_replace=moe.first_dense_layers,
            num_nextn_predict_layers=0,
        )
    if family == "deepseek_v2":
        config.update(
            n_routed_experts=moe.num_routed_experts,
            n_shared_experts=moe.num_shared_experts,
            topk_method="group_limited_greedy" if grouped else "greedy",
            n_group=moe.n_group if grouped else None,
            topk_group=moe.topk_group if grouped else None,
            routed_scaling_factor=moe.routed_scaling_factor,
            norm_topk_prob=False,
            first_k_dense_replace=moe.first_dense_layers,
            aux_loss_alpha=moe.aux_loss_coef,
        )
    if family in ("deepseek_v2", "deepseek_v3"):
        mla = model.mla
        config.update(
            num_key_value_heads=model.num_heads,
            q_lora_rank=mla.q_lora_rank or None,
            kv_lora_rank=mla.kv_lora_rank,
            qk_nope_head_dim=mla.qk_nope_head_dim,
            qk_rope_head_dim=mla.qk_rope_head_dim,
            v_head_dim=mla.v_head_dim,
        )
        if family == "deepseek_v3":
            config["rope_interleave"] = False  # the engine's rotate-half layout (DeepSeek-V2 has only interleaved)
    else:
        config.update(num_key_value_heads=model.kv_heads, head_dim=model.head_dim)
    if family == "glm4_moe":
        config.update(use_qk_norm=False, partial_rotary_factor=1.0)
        config["rope_parameters"]["partial_rotary_factor"] = 1.0
    if family == "qwen2_moe":
        config.update(
            num_experts=moe.num_routed_experts,
            shared_expert_intermediate_size=moe.num_shared_experts * moe.expert_hidden_size,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(moe.first_dense_layers)),
            qkv_bias=False,
            use_sliding_window=False,
            router_aux_loss_coef=moe.aux_loss_coef,
        )
    return config


# --------------------------------------------------------------------------------------------------------
# Weights: engine -> HF
# --------------------------------------------------------------------------------------------------------


def _swiglu_halves(w_in: Tensor, hidden: int) -> tuple[Tensor, Tensor]:
    """An engine ``nn.Linear`` SwiGLU input weight ``(2H, C)`` -> HF ``gate_proj``, ``up_proj`` ``(H, C)`` each."""
    return w_in[:hidden], w_in[hidden:]


def _interleave_rows(weight: Tensor, heads: int, nope: int, rope: int) -> Tensor:
    """The inverse of ``_deinterleave_rows``: each head's last ``rope`` rows from rotate-half order
    ``(x0 .. x_{R/2-1}, x_{R/2} ..)`` to interleaved pairs ``(x0, x_{R/2}), (x1, x_{R/2+1}) ...``, which an
    interleaved rotation turns by the same angles (the attention scores, dot products over both, are unchanged)."""
    w = weight.view(heads, nope + rope, -1)
    first, second = w[:, nope : nope + rope // 2], w[:, nope + rope // 2 :]
    pairs = torch.stack((first, second), dim=2).reshape(heads, rope, -1)  # (heads, R, in): x0, x_{R/2}, x1 ...
    return torch.cat((w[:, :nope], pairs), dim=1).reshape(weight.shape)


def to_hf_state_dict(model: ModelSpec, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The engine's ``state_dict`` (``MoETransformer``, as its checkpoints store it) renamed and reshaped for the
    family of ``model``. MTP modules are left out. Every tensor is a fresh contiguous fp32 copy."""
    family = hf_family(model)
    moe = model.moe
    out: dict[str, Tensor] = {}

    def put(name: str, tensor: Tensor) -> None:
        out[name] = tensor.detach().to(torch.float32).contiguous().clone()

    put("model.embed_tokens.weight", state["embed.weight"])
    put("model.norm.weight", state["norm.weight"])
    if not model.tie_embeddings:
        put("lm_head.weight", state["lm_head.weight"])
    for i in range(model.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        put(dst + "input_layernorm.weight", state[src + "attn_norm.weight"])
        put(dst + "post_attention_layernorm.weight", state[src + "ffn_norm.weight"])
        attn = dst + "self_attn."
        if model.attention == "mla":
            mla = model.mla
            q, kv_down = state[src + "attn.q_proj.weight"], state[src + "attn.kv_down.weight"]
            if family == "deepseek_v2":  # its rotary encoding is interleaved only
                q = _interleave_rows(q, model.num_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim)
                kv_down = _interleave_rows(kv_down, 1, mla.kv_lora_rank, mla.qk_rope_head_dim)
            if mla.q_lora_rank:
                put(attn + "q_a_proj.weight", state[src + "attn.q_down.weight"])
                put(attn + "q_a_layernorm.weight", state[src + "attn.q_norm.weight"])
                put(attn + "q_b_proj.weight", q)
            else:
                put(attn + "q_proj.weight", q)
            put(attn + "kv_a_proj_with_mqa.weight", kv_down)
            put(attn + "kv_a_layernorm.weight", state[src + "attn.kv_norm.weight"])
            put(attn + "kv_b_proj.weight", state[src + "attn.kv_up.weight"])
        else:
            q_rows, kv_rows = model.num_heads * model.head_dim, model.kv_heads * model.head_dim
            q, k, v = state[src + "attn.qkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
            put(attn + "q_proj.weight", q)
            put(attn + "k_proj.weight", k)
            put(attn + "v_proj.weight", v)
        put(attn + "o_proj.weight", state[src + "attn.out.weight"])

        mlp = dst + "mlp."
        if i < moe.first_dense_layers:
            gate, up = _swiglu_halves(state[src + "ffn.w_in.weight"], moe.resolved_dense_hidden_size)
            put(mlp + "gate_proj.weight", gate)
            put(mlp + "up_proj.weight", up)
            put(mlp + "down_proj.weight", state[src + "ffn.w_out.weight"])
            continue
        # Folding the temperature into the weight: the router computes x W^T / t.
        router = state[src + "ffn.router.weight"].to(torch.float32)
        put(mlp + "gate.weight", router / moe.router_temperature if moe.router_temperature != 1.0 else router)
        H = moe.expert_hidden_size
        w_in, w_out = state[src + "ffn.w_in"], state[src + "ffn.w_out"]  # (E, C, 2H), (E, H, C)
        down_scale = moe.routed_scaling_factor if family == "qwen2_moe" else 1.0
        for e in range(moe.num_routed_experts):
            expert = f"{mlp}experts.{e}."
            put(expert + "gate_proj.weight", w_in[e, :, :H].t())
            put(expert + "up_proj.weight", w_in[e, :, H:].t())
            down = w_out[e].t()
            put(expert + "down_proj.weight", down * down_scale if down_scale != 1.0 else down)
        shared_hidden = moe.num_shared_experts * H
        if family == "qwen2_moe":
            shared = mlp + "shared_expert."
            if moe.num_shared_experts:
                gate, up = _swiglu_halves(state[src + "ffn.shared.w_in.weight"], shared_hidden)
                down = state[src + "ffn.shared.w_out.weight"] * 2.0  # sigmoid(0) = 1/2 undoes it
            else:
                gate = up = torch.zeros(0, model.hidden_size)
                down = torch.zeros(model.hidden_size, 0)
            put(shared + "gate_proj.weight", gate)
            put(shared + "up_proj.weight", up)
            put(shared + "down_proj.weight", down)
            put(mlp + "shared_expert_gate.weight", torch.zeros(1, model.hidden_size))
        else:
            if family != "deepseek_v2":  # DeepSeek-V2's router has no selection bias (the spec has none to give)
                put(mlp + "gate.e_score_correction_bias", state[src + "ffn.router.bias"])
            shared = mlp + "shared_experts."
            if moe.num_shared_experts:
                gate, up = _swiglu_halves(state[src + "ffn.shared.w_in.weight"], shared_hidden)
                down = state[src + "ffn.shared.w_out.weight"]
            else:  # the families always build a shared expert: a zero-width one adds nothing
                gate = up = torch.zeros(0, model.hidden_size)
                down = torch.zeros(model.hidden_size, 0)
            put(shared + "gate_proj.weight", gate)
            put(shared + "up_proj.weight", up)
            put(shared + "down_proj.weight", down)
    return out


# --------------------------------------------------------------------------------------------------------
# Weights: HF -> engine
# --------------------------------------------------------------------------------------------------------


def _deinterleave_rows(weight: Tensor, heads: int, nope: int, rope: int) -> Tensor:
    """``weight`` ``(heads * (nope + rope), in)``, each head's last ``rope`` rows in DeepSeek's interleaved pairs
    ``(x0, x1), (x2, x3) ...``: the same rows in rotate-half order ``(x0, x2, ..., x1, x3, ...)``. Rotate-half
    applied to these rows yields exactly what the interleaved rotation yields (transformers' own implementation
    of it writes its output in this order)."""
    w = weight.view(heads, nope + rope, -1)
    r = w[:, nope:]
    return torch.cat((w[:, :nope], r[:, 0::2], r[:, 1::2]), dim=1).reshape(weight.shape)


def from_hf_state_dict(
    model: ModelSpec, family: str, tensors: Mapping[str, Tensor], config: Mapping[str, Any]
) -> dict[str, Tensor]:
    """HF tensors of ``family`` (``tensors``, per-expert or fused expert layout) -> the engine's ``state_dict`` for
    ``model`` (the spec ``spec_from_hf_config`` derived). Raises ``HFImportError`` naming a missing or misshapen
    tensor, or a weight the engine cannot represent (a non-zero Qwen shared-expert gate)."""
    moe = model.moe
    out: dict[str, Tensor] = {}

    def get(name: str) -> Tensor:
        if name not in tensors:
            raise HFImportError(name, "missing from model.safetensors")
        return tensors[name].to(torch.float32)

    def put(name: str, tensor: Tensor) -> None:
        out[name] = tensor.contiguous().clone()

    put("embed.weight", get("model.embed_tokens.weight"))
    put("norm.weight", get("model.norm.weight"))
    if not model.tie_embeddings:
        put("lm_head.weight", get("lm_head.weight"))
    interleaved = family == "deepseek_v2" or (family == "deepseek_v3" and bool(config.get("rope_interleave", True)))
    for i in range(model.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        put(dst + "attn_norm.weight", get(src + "input_layernorm.weight"))
        put(dst + "ffn_norm.weight", get(src + "post_attention_layernorm.weight"))
        attn = src + "self_attn."
        if model.attention == "mla":
            mla, H = model.mla, model.num_heads
            q = get(attn + ("q_b_proj.weight" if mla.q_lora_rank else "q_proj.weight"))
            kv_down = get(attn + "kv_a_proj_with_mqa.weight")
            if interleaved:
                q = _deinterleave_rows(q, H, mla.qk_nope_head_dim, mla.qk_rope_head_dim)
                kv_down = _deinterleave_rows(kv_down, 1, mla.kv_lora_rank, mla.qk_rope_head_dim)
            if mla.q_lora_rank:
                put(dst + "attn.q_down.weight", get(attn + "q_a_proj.weight"))
                put(dst + "attn.q_norm.weight", get(attn + "q_a_layernorm.weight"))
            put(dst + "attn.q_proj.weight", q)
            put(dst + "attn.kv_down.weight", kv_down)
            put(dst + "attn.kv_norm.weight", get(attn + "kv_a_layernorm.weight"))
            put(dst + "attn.kv_up.weight", get(attn + "kv_b_proj.weight"))
        else:
            qkv = (get(attn + f"{p}_proj.weight") for p in "qkv")
            put(dst + "attn.qkv.weight", torch.cat(tuple(qkv), dim=0))
        put(dst + "attn.out.weight", get(attn + "o_proj.weight"))

        mlp = src + "mlp."
        if i < moe.first_dense_layers:
            w_in = torch.cat((get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")), dim=0)
            put(dst + "ffn.w_in.weight", w_in)
            put(dst + "ffn.w_out.weight", get(mlp + "down_proj.weight"))
            continue
        put(dst + "ffn.router.weight", get(mlp + "gate.weight"))
        E = moe.num_routed_experts
        if f"{mlp}experts.gate_up_proj" in tensors:  # transformers >= 5's fused layout
            gate_up = get(f"{mlp}experts.gate_up_proj")  # (E, 2H, C)
            down_all = get(f"{mlp}experts.down_proj")  # (E, C, H)
            w_in = gate_up.transpose(1, 2)  # (E, C, 2H)
            w_out = down_all.transpose(1, 2)  # (E, H, C)
        else:
            w_in = torch.stack(
                [
                    torch.cat((get(f"{mlp}experts.{e}.gate_proj.weight"), get(f"{mlp}experts.{e}.up_proj.weight"))).t()
                    for e in range(E)
                ]
            )
            w_out = torch.stack([get(f"{mlp}experts.{e}.down_proj.weight").t() for e in range(E)])
        put(dst + "ffn.w_in", w_in)
        put(dst + "ffn.w_out", w_out)
        if family == "qwen2_moe":
            gate_w = get(mlp + "shared_expert_gate.weight")
            if bool(gate_w.any()):
                raise HFImportError(
                    mlp + "shared_expert_gate.weight",
                    "a learned shared-expert gate: the engine's shared experts are ungated (only an all-zero gate, "
                    "a constant 1/2, can be represented)",
                )
            put(dst + "ffn.router.bias", torch.zeros(E))
            if moe.num_shared_experts:
                shared = mlp + "shared_expert."
                put(
                    dst + "ffn.shared.w_in.weight",
                    torch.cat((get(shared + "gate_proj.weight"), get(shared + "up_proj.weight"))),
                )
                put(dst + "ffn.shared.w_out.weight", get(shared + "down_proj.weight") * 0.5)
        else:
            bias_name = mlp + "gate.e_score_correction_bias"
            put(dst + "ffn.router.bias", get(bias_name) if bias_name in tensors else torch.zeros(E))
            if moe.num_shared_experts:
                shared = mlp + "shared_experts."
                put(
                    dst + "ffn.shared.w_in.weight",
                    torch.cat((get(shared + "gate_proj.weight"), get(shared + "up_proj.weight"))),
                )
                put(dst + "ffn.shared.w_out.weight", get(shared + "down_proj.weight"))
    return out


# --------------------------------------------------------------------------------------------------------
# config.json -> the model section of a spec
# --------------------------------------------------------------------------------------------------------


def _rope_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``rope_parameters`` (transformers ≥ 5) or the older ``rope_theta`` / ``rope_scaling`` keys, as one dict."""
    params = config.get("rope_parameters")
    if params is None:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if not isinstance(params, dict):
        raise HFImportError("rope_parameters", "must be an object")
    return params


def spec_from_hf_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(family, the model section of a spec)`` from a ``config.json``. Raises ``HFImportError`` naming the
    config key the engine cannot represent; the section itself is validated by ``Spec`` (errors name
    ``model.*``)."""
    family = config.get("model_type")
    if family not in ARCHITECTURES:
        raise HFImportError("model_type", f"{family!r}: supported families are {', '.join(sorted(ARCHITECTURES))}")

    def refuse_unless(key: str, ok: bool, message: str) -> None:
        if not ok:
            raise HFImportError(key, f"{config.get(key)!r}: {message}")

    refuse_unless("hidden_act", config.get("hidden_act", "silu") == "silu", "the engine's experts are SiLU-gated")
    rope = _rope_settings(config)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFImportError("rope_parameters.rope_type", f"{rope.get('rope_type')!r}: only unscaled rotary encoding")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    moe: dict[str, Any] = {
        "top_k": config["num_experts_per_tok"],
        "expert_hidden_size": config["moe_intermediate_size"],
    }
    model: dict[str, Any] = {
        "task": "causal_lm",
        "vocab_size": config["vocab_size"],
        "num_layers": config["num_hidden_layers"],
        "hidden_size": hidden,
        "num_heads": heads,
        "max_seq_len": config.get("max_position_embeddings", 2048),
        "activation": "swiglu",
        "norm": "rmsnorm",
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "attention_dropout": float(config.get("attention_dropout") or 0.0),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "init_std": config.get("initializer_range", 0.02),
        "moe": moe,
    }
    if family in ("deepseek_v3", "glm4_moe"):
        refuse_unless("attention_bias", not config.get("attention_bias", False), "the engine's attention has no biases")
        refuse_unless("norm_topk_prob", config.get("norm_topk_prob", True) is True,
                      "the engine normalises the chosen sigmoid scores")  # fmt: skip
        refuse_unless("scoring_func", config.get("scoring_func", "sigmoid") == "sigmoid", "sigmoid scoring only")
        moe.update(
            num_routed_experts=config["n_routed_experts"],
            num_shared_experts=config.get("n_shared_experts", 1) or 0,
            first_dense_layers=config.get("first_k_dense_replace", 0) or 0,
            dense_hidden_size=config["intermediate_size"],
            scoring="sigmoid",
            balancing="aux_free",
            n_group=config.get("n_group") or 1,
            topk_group=config.get("topk_group") or 1,
            routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        )
    if family == "deepseek_v2":
        refuse_unless("attention_bias", not config.get("attention_bias", False), "the engine's attention has no biases")
        refuse_unless("norm_topk_prob", not config.get("norm_topk_prob", False),
                      "the engine keeps the top-k softmax scores as they are")  # fmt: skip
        method = config.get("topk_method", "greedy")
        refuse_unless("topk_method", method in ("greedy", "group_limited_greedy"), "greedy or group_limited_greedy")
        grouped = method == "group_limited_greedy"
        moe.update(
            num_routed_experts=config["n_routed_experts"],
            num_shared_experts=config.get("n_shared_experts", 1) or 0,
            first_dense_layers=config.get("first_k_dense_replace", 0) or 0,
            dense_hidden_size=config["intermediate_size"],
            scoring="softmax",
            balancing="aux_loss",
            aux_loss_coef=float(config.get("aux_loss_alpha", 0.001)),
            n_group=(config.get("n_group") or 1) if grouped else 1,
            topk_group=(config.get("topk_group") or 1) if grouped else 1,
            routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        )
    if family in ("deepseek_v2", "deepseek_v3"):
        model["attention"] = "mla"
        model["mla"] = {
            "q_lora_rank": config.get("q_lora_rank") or 0,
            "kv_lora_rank": config["kv_lora_rank"],
            "qk_nope_head_dim": config["qk_nope_head_dim"],
            "qk_rope_head_dim": config["qk_rope_head_dim"],
            "v_head_dim": config["v_head_dim"],
        }
    else:
        head_dim = config.get("head_dim") or hidden // heads
        refuse_unless("head_dim", head_dim * heads == hidden, "the engine's head width is hidden_size / heads")
        kv = config.get("num_key_value_heads") or heads
        model["attention"] = "mha" if kv == heads else "gqa"
        model["num_kv_heads"] = None if kv == heads else kv
    if family == "glm4_moe":
        refuse_unless("use_qk_norm", not config.get("use_qk_norm", False), "the engine has no per-head query/key norm")
        partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
        if partial != 1.0:
            raise HFImportError("partial_rotary_factor", f"{partial!r}: the engine rotates the whole head")
    if family == "qwen2_moe":
        refuse_unless("qkv_bias", config.get("qkv_bias", True) is False, "the engine's attention has no biases")
        refuse_unless("use_sliding_window", not config.get("use_sliding_window", False), "full attention only")
        refuse_unless("norm_topk_prob", not config.get("norm_topk_prob", False),
                      "the engine keeps the top-k softmax scores as they are")  # fmt: skip
        refuse_unless("decoder_sparse_step", config.get("decoder_sparse_step", 1) == 1, "every layer after the "
                      "dense ones is an MoE layer")  # fmt: skip
        dense = list(config.get("mlp_only_layers") or [])
        refuse_unless("mlp_only_layers", dense == list(range(len(dense))), "dense layers come first, then MoE")
        shared = config.get("shared_expert_intermediate_size", 0) or 0
        expert = config["moe_intermediate_size"]
        refuse_unless("shared_expert_intermediate_size", shared % expert == 0,
                      "a whole number of moe_intermediate_size experts")  # fmt: skip
        moe.update(
            num_routed_experts=config["num_experts"],
            num_shared_experts=shared // expert,
            first_dense_layers=len(dense),
            dense_hidden_size=config["intermediate_size"],
            scoring="softmax",
            balancing="aux_loss",
            aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
        )
    return family, model


# --------------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# What a folder may hold: JSON, safetensors and a few text files. Anything else is refused by name (pickles,
# PyTorch .bin/.pt checkpoints, sentencepiece models): nothing is ever unpickled.
ALLOWED_FILES = frozenset(
    {CONFIG, WEIGHTS, *TOKENIZER_FILES, "generation_config.json", "README.md", "LICENSE", ".gitattributes"}
)


@dataclass
class HFFolder:
    """A checked Hugging Face folder: its family, config, the spec's model section derived from the config, and
    its files."""

    path: Path
    family: str
    config: dict[str, Any]
    model: dict[str, Any]
    tokenizer: Path | None = None
    notes: list[str] = field(default_factory=list)


def check_folder_files(names: list[str]) -> None:
    """Refuse, by name, a file a folder must not hold (see ``ALLOWED_FILES``); require config.json and weights."""
    for name in names:
        if name not in ALLOWED_FILES:
            if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
                raise HFImportError(name, "sharded weights: merge them into one model.safetensors")
            raise HFImportError(
                name, f"not accepted: a folder holds only {', '.join(sorted(ALLOWED_FILES))} (JSON and safetensors; "
                "nothing is unpickled)",
            )  # fmt: skip
    for required in (CONFIG, WEIGHTS):
        if required not in names:
            raise HFImportError(required, "missing: a folder needs config.json and model.safetensors")


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFImportError(CONFIG, f"not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise HFImportError(CONFIG, "must be a JSON object")
    return config


def read_hf_folder(path: str | os.PathLike[str]) -> HFFolder:
    """Check a folder's files (``check_folder_files``) and derive the model section from its ``config.json``.
    Reads the safetensors header only (names, shapes, dtypes): the weights are checked against the derived model
    by ``check_weights``."""
    root = Path(path)
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    check_folder_files(names)
    config = read_config(root / CONFIG)
    try:
        family, model = spec_from_hf_config(config)
    except KeyError as exc:
        raise HFImportError(str(exc.args[0]), "missing from config.json") from None
    tokenizer = root / "tokenizer.json"
    folder = HFFolder(root, family, config, model, tokenizer if tokenizer.is_file() else None)
    if config.get("num_nextn_predict_layers"):
        folder.notes.append(
            "its multi-token prediction layers are not imported (set model.mtp_depth to train new ones)"
        )
    return folder


def derived_spec(folder: HFFolder) -> dict[str, Any]:
    """The spec (as a dict, to validate like any other) of a job that starts from ``folder``: its model section,
    and sequences no longer than the model's positions."""
    max_len = folder.model.get("max_seq_len", 256)
    return {"model": folder.model, "data": {"seq_len": min(256, max_len) if isinstance(max_len, int) else 256}}


def _safetensors_header(path: Path) -> dict[str, tuple[list[int], str]]:
    """``{tensor name: (shape, dtype)}`` of a safetensors file, from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            return {name: (list(s.get_shape()), str(s.get_dtype())) for name, s in slices.items()}
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        raise HFImportError(WEIGHTS, f"not a readable safetensors file: {exc}") from None


def engine_state_from_folder(folder: HFFolder, model: ModelSpec) -> dict[str, Tensor]:
    """The engine ``state_dict`` of ``folder``'s weights for ``model`` (its architecture must be the derived one;
    fields that do not shape weights, such as dropout or mtp_depth, may differ). Shapes are checked against the
    engine's model, each error naming the tensor."""
    from workers.engine.model import build_model  # the model module is heavy; only weights loading needs it

    header = _safetensors_header(folder.path / WEIGHTS)
    for name, (_, dtype) in header.items():
        if dtype not in ("F32", "BF16", "F16", "F64"):
            raise HFImportError(name, f"dtype {dtype}: floating-point weights only")
    tensors = load_file(str(folder.path / WEIGHTS))
    state = from_hf_state_dict(model, folder.family, tensors, folder.config)
    with torch.device("meta"):
        expected = build_model(Spec.model_construct(model=model)).state_dict()  # validated by the caller
    for name, tensor in state.items():
        if name not in expected:
            raise HFImportError(name, "a tensor the derived model does not have")
        if list(tensor.shape) != list(expected[name].shape):
            raise HFImportError(
                name, f"shape {list(tensor.shape)} where the derived model expects {list(expected[name].shape)}"
            )
    missing = sorted(k for k in expected if k not in state and not k.startswith("mtp."))
    if missing:
        raise HFImportError(missing[0], "missing after conversion")
    return state


def load_hf_weights(model: torch.nn.Module, folder_path: str | os.PathLike[str]) -> list[str]:
    """Initialise ``model`` (an ``MoETransformer``) from a Hugging Face folder; returns the names of parameters
    that stay freshly initialised (the MTP modules', which the folder does not carry). The model's spec must
    describe the folder's architecture (``HFImportError`` names the first tensor that disagrees)."""
    folder = read_hf_folder(folder_path)
    spec: Spec = model.spec  # type: ignore[assignment]
    state = engine_state_from_folder(folder, spec.model)
    device = next(model.parameters()).device
    result = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    if result.unexpected_keys:
        raise HFImportError(result.unexpected_keys[0], "a tensor the job's model does not have")
    fresh = [k for k in result.missing_keys if k.startswith("mtp.")]
    if len(fresh) != len(result.missing_keys):
        raise HFImportError(sorted(set(result.missing_keys) - set(fresh))[0], "missing from the folder")
    return fresh


# --------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------


@dataclass
class HFExport:
    """What ``export_hf`` wrote: the family, its transformers class and ``{file name: path}``."""

    family: str
    architecture: str
    files: dict[str, Path]


def special_tokens(tokenizer_path: Path | None) -> SpecialTokens:
    if tokenizer_path is None:
        return SpecialTokens()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    return SpecialTokens(bos=tok.token_to_id("<bos>"), eos=tok.token_to_id("<eos>"), pad=tok.token_to_id("<pad>"))


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_hf_folder(
    model: ModelSpec,
    state: Mapping[str, Tensor],
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str] | None = None,
) -> HFExport:
    """Write the Hugging Face folder of an engine ``state`` into ``out_dir`` (created). Deterministic: the same
    inputs give the same bytes. Raises ``NotExpressible`` before writing anything for a spec no family
    expresses."""
    family = hf_family(model)
    tokenizer_path = Path(tokenizer) if tokenizer is not None else None
    specials = special_tokens(tokenizer_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def place(name: str, text: str) -> None:
        (out / name).write_text(text)
        files[name] = out / name

    place(CONFIG, _dump(hf_config(model, specials)))
    generation = {"bos_token_id": specials.bos, "eos_token_id": specials.eos, "pad_token_id": specials.pad}
    place("generation_config.json", _dump({k: v for k, v in generation.items() if v is not None}))
    save_file(to_hf_state_dict(model, state), str(out / WEIGHTS), metadata=_SAFETENSORS_METADATA)
    files[WEIGHTS] = out / WEIGHTS
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / "tokenizer.json")
        files["tokenizer.json"] = out / "tokenizer.json"
        names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        present = {k: v for k, v in names.items() if getattr(specials, k.split("_")[0]) is not None}
        place(
            "tokenizer_config.json",
            _dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.max_seq_len, **present}),
        )
        place("special_tokens_map.json", _dump(present))
    return HFExport(family, ARCHITECTURES[family], files)


def export_hf(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str] | None = None,
) -> HFExport:
    """The Hugging Face folder of an engine checkpoint (``model.safetensors`` + ``spec.json``), with
    ``tokenizer`` (the run's ``tokenizer.json``) when given."""
    from workers.engine.spec import load_spec

    root = Path(checkpoint_dir)
    spec = load_spec(json.loads((root / "spec.json").read_text()))
    return write_hf_folder(spec.model, load_file(str(root / WEIGHTS)), out_dir, tokenizer=tokenizer)


def reexport_folder(folder_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> HFExport:
    """Import a Hugging Face folder into the engine's form and export it again (the round trip the tests hold
    to byte equality)."""
    folder = read_hf_folder(folder_path)
    model = Spec.model_validate(derived_spec(folder)).model
    state = engine_state_from_folder(folder, model)
    return write_hf_folder(model, state, out_dir, tokenizer=folder.tokenizer)


# --------------------------------------------------------------------------------------------------------
# Zip: the folder as one download, and an uploaded zip back to a folder
# --------------------------------------------------------------------------------------------------------

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same folder always zips to the same bytes


def zip_folder(files: Mapping[str, Path], zip_path: str | os.PathLike[str], *, prefix: str = "") -> Path:
    """Zip ``{name: path}`` into ``zip_path`` under ``prefix/`` (a folder when unzipped); deterministic bytes.
    The weights are stored (they do not compress), the JSON files deflated."""
    import zipfile

    with zipfile.ZipFile(zip_path, "w") as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(f"{prefix}/{name}" if prefix else name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_STORED if name.endswith(".safetensors") else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(files[name], "rb") as src, archive.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return Path(zip_path)


def export_summary(
    checkpoint_dir: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    prefix: str = "",
) -> tuple[dict[str, Any], Path | None]:
    """What a report says and offers about the Hugging Face export of a checkpoint: ``(summary, zip path or
    None)``. ``summary``: ``{"family", "architecture", "field", "reason"}``; ``field`` is the spec field that
    prevents the export (then ``family``, ``architecture`` and the zip are None)."""
    work = Path(work_dir)
    try:
        export = export_hf(checkpoint_dir, work / "folder", tokenizer=tokenizer)
    except NotExpressible as refused:
        return {"family": None, "architecture": None, "field": refused.field, "reason": refused.message}, None
    archive = zip_folder(export.files, work / "huggingface.zip", prefix=prefix)
    reason = (
        f"loads with transformers' AutoModelForCausalLM.from_pretrained as {export.architecture}"
        + (" (the multi-token prediction modules are left out: transformers does not run them)"
           if load_spec_model(checkpoint_dir).mtp_depth else "")
    )  # fmt: skip
    return {"family": export.family, "architecture": export.architecture, "field": None, "reason": reason}, archive


def load_spec_model(checkpoint_dir: str | os.PathLike[str]) -> ModelSpec:
    from workers.engine.spec import load_spec

    return load_spec(json.loads((Path(checkpoint_dir) / "spec.json").read_text())).model


# Model fields a job may set differently from the folder it starts from: they shape no imported weight (dropout,
# initialisation of new parts, the MTP modules that start fresh, balancing and capacity, which act in training).
ADJUSTABLE_MODEL_FIELDS = frozenset({"dropout", "attention_dropout", "init_std", "mtp_depth", "max_seq_len"})
ADJUSTABLE_MOE_FIELDS = frozenset(
    {"balancing", "aux_loss_coef", "bias_update_speed", "router_z_loss_coef", "capacity_factor"}
)


def architecture_differences(job: ModelSpec, derived: ModelSpec) -> list[tuple[str, str]]:
    """``[(spec path, message)]`` for every model field where a job that starts from a folder departs from the
    architecture the folder's ``config.json`` describes (fields in ``ADJUSTABLE_*`` may differ)."""
    out: list[tuple[str, str]] = []
    for name in ModelSpec.model_fields:
        if name in ADJUSTABLE_MODEL_FIELDS:
            continue
        mine, theirs = getattr(job, name), getattr(derived, name)
        if name == "moe":
            for field_name in type(mine).model_fields:
                a, b = getattr(mine, field_name), getattr(theirs, field_name)
                if field_name not in ADJUSTABLE_MOE_FIELDS and a != b:
                    out.append((f"model.moe.{field_name}", f"{a!r}: the checkpoint has {b!r}"))
        elif name == "mla":
            if job.attention == "mla" and mine != theirs:
                out.append(("model.mla", f"{mine.model_dump()}: the checkpoint has {theirs.model_dump()}"))
        elif mine != theirs:
            out.append((f"model.{name}", f"{mine!r}: the checkpoint has {theirs!r}"))
    if job.max_seq_len > derived.max_seq_len:
        out.append(("model.max_seq_len", f"{job.max_seq_len}: the checkpoint has {derived.max_seq_len} positions"))
    return out
