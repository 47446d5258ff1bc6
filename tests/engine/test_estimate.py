"""Parameter arithmetic of ``estimate`` against models that are actually built."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from workers.engine.estimate import (
    active_parameters,
    count_parameters,
    estimate,
    estimate_memory,
    kv_cache_bytes_per_token,
    parameter_breakdown,
)
from workers.engine.hardware import get_profile
from workers.engine.model import MoEFeedForward, build_model
from workers.engine.spec import Spec


def _spec(model: dict[str, Any] | None = None, moe: dict[str, Any] | None = None) -> Spec:
    m: dict[str, Any] = {"vocab_size": 300, "num_layers": 2, "hidden_size": 32, "num_heads": 4, "max_seq_len": 32}
    m.update(model or {})
    m["moe"] = {"num_routed_experts": 8, "top_k": 2, "expert_hidden_size": 16, **(moe or {})}
    return Spec.model_validate({"model": m, "data": {"tokenizer": "bytes", "seq_len": 16}})


SPECS = [
    pytest.param({}, {}, id="defaults"),
    pytest.param({"tie_embeddings": False}, {}, id="untied"),
    pytest.param({"num_kv_heads": 2}, {}, id="gqa"),
    pytest.param({"num_kv_heads": 1, "num_heads": 8}, {}, id="mqa"),
    pytest.param({"task": "classification", "num_labels": 5}, {}, id="classification"),
    pytest.param({"task": "classification", "num_labels": 2, "tie_embeddings": False}, {}, id="cls-untied"),
    pytest.param({}, {"first_dense_layers": 1}, id="one-dense"),
    pytest.param({}, {"first_dense_layers": 2}, id="all-dense"),
    pytest.param({}, {"first_dense_layers": 1, "dense_hidden_size": 40}, id="dense-width"),
    pytest.param({}, {"num_shared_experts": 0}, id="no-shared"),
    pytest.param({}, {"num_shared_experts": 3}, id="three-shared"),
    pytest.param({"activation": "gelu"}, {"first_dense_layers": 1}, id="gelu"),
    pytest.param({"activation": "relu"}, {"num_shared_experts": 2}, id="relu"),
    pytest.param({"norm": "layernorm"}, {}, id="layernorm"),
    pytest.param({"norm": "layernorm", "activation": "gelu", "tie_embeddings": False}, {}, id="ln-gelu-untied"),
    pytest.param({}, {"num_routed_experts": 1, "top_k": 1}, id="one-expert"),
    pytest.param({}, {"num_routed_experts": 64, "top_k": 6, "expert_hidden_size": 8}, id="fine-grained"),
    pytest.param({"num_layers": 5, "hidden_size": 48, "num_heads": 6}, {"first_dense_layers": 2}, id="deeper"),
    pytest.param({"vocab_size": 1000, "hidden_size": 64, "num_heads": 2}, {"expert_hidden_size": 6}, id="odd-width"),
    pytest.param({"num_layers": 1}, {"scoring": "sigmoid", "balancing": "aux_loss"}, id="single-layer"),
    pytest.param({"attention": "mla"}, {}, id="mla"),
    pytest.param(
        {"attention": "mla", "mla": {"q_lora_rank": 24, "v_head_dim": 8}, "norm": "layernorm"}, {}, id="mla-q"
    ),
    pytest.param({"mtp_depth": 2, "tie_embeddings": False}, {"n_group": 4, "topk_group": 2}, id="mtp-moe"),
    pytest.param({"mtp_depth": 1, "attention": "mla"}, {"first_dense_layers": 2}, id="mtp-dense"),
]


@pytest.mark.parametrize(("model", "moe"), SPECS)
def test_count_parameters_equals_the_built_model(model: dict[str, Any], moe: dict[str, Any]) -> None:
    spec = _spec(model, moe)
    built = build_model(spec)
    assert count_parameters(spec) == sum(p.numel() for p in built.parameters())
    breakdown = parameter_breakdown(spec)
    parts = [
        "embedding",
        "attention",
        "dense_ffn",
        "routed_experts",
        "shared_experts",
        "router",
        "norms",
        "head",
        "mtp",
    ]
    assert sum(breakdown[p] for p in parts) == breakdown["total"]


@pytest.mark.parametrize(("model", "moe"), SPECS)
def test_active_parameters_leave_out_only_the_unchosen_experts(model: dict[str, Any], moe: dict[str, Any]) -> None:
    spec = _spec(model, moe)
    built = build_model(spec)
    unchosen = 0
    for layer in [m for m in built.modules() if isinstance(m, MoEFeedForward)]:  # the MTP modules' too
        per_expert = (layer.w_in.numel() + layer.w_out.numel()) // layer.num_experts
        unchosen += (layer.num_experts - layer.top_k) * per_expert
    assert active_parameters(spec) == count_parameters(spec) - unchosen


def test_active_parameters_by_hand() -> None:
    # 2 MoE layers, C=32, 8 experts of SwiGLU width 16 (3 * 32 * 16 = 1536 each), top-2, 1 shared, tied.
    spec = _spec(moe={"num_shared_experts": 1})
    embedding = 300 * 32
    attention = 2 * (32 * 96 + 32 * 32)
    expert = 3 * 32 * 16
    per_layer_active = 2 * expert + expert + 8 * 32  # routed top-2 + shared + router
    norms = 5 * 32
    assert active_parameters(spec) == embedding + attention + 2 * per_layer_active + norms
    # Matmul parameters (for FLOPs): no embedding lookup or norms, but the tied output projection.
    assert parameter_breakdown(spec)["active_matmul"] == attention + 2 * per_layer_active + 300 * 32


def test_mla_parameters_by_hand() -> None:
    spec = _spec({"attention": "mla", "mla": {"q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                               "qk_rope_head_dim": 4, "v_head_dim": 6}})  # fmt: skip
    per_layer = 32 * 24 + 24 * 4 * 12 + 32 * (16 + 4) + 16 * 4 * (8 + 6) + 4 * 6 * 32  # q down/up, kv down/up, out
    b = parameter_breakdown(spec)
    assert b["attention"] == 2 * per_layer
    assert b["norms"] == 5 * 32 + 2 * (24 + 16)  # the latents' RMSNorms are norms, not matmuls
    assert b["mtp"] == 0


def test_the_estimate_reports_the_kv_cache_and_each_optimizer_s_state() -> None:
    cpu = get_profile("cpu")
    mha, mla = _spec(), _spec({"attention": "mla"})
    assert estimate(mha, cpu).kv_cache == {
        "bytes_per_token": kv_cache_bytes_per_token(mha),
        "bytes_per_token_16bit": kv_cache_bytes_per_token(mha) // 2,
        "bytes_per_sequence": kv_cache_bytes_per_token(mha) * 32,
    }
    assert estimate(mla, cpu).as_dict()["kv_cache"]["bytes_per_token"] == 2 * (128 + 32) * 4
    n = count_parameters(mha)
    memory = {}
    for name in ("adamw", "adafactor", "sgd", "muon"):
        raw = mha.model_dump(mode="json")
        raw["training"]["optimizer"] = {"name": name}
        memory[name] = estimate_memory(Spec.model_validate(raw), cpu).optimizer
    assert memory["adamw"] == 8 * n and memory["sgd"] == 4 * n
    assert memory["adafactor"] < memory["sgd"] < memory["muon"] < memory["adamw"]


def test_estimate_does_not_import_torch() -> None:
    code = "import sys, workers.engine.estimate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
