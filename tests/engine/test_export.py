"""Tests of the deployment artifacts, ONNX parity, int8, latency and advice (workers/engine/export.py).

The causal checkpoint is real (``train()`` for a few steps of a tiny MoE with 8 routed experts + 1 shared,
top-2, on a patterned byte corpus) and is exported once for the module (the ONNX export takes ~15 s here).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from tests.engine.specs import merged_spec
from tests.engine.tiny import write_letters_corpus
from workers.engine.checkpoint import save_checkpoint, verify_checkpoint
from workers.engine.data import load_tokenizer
from workers.engine.evaluate import load_for_inference
from workers.engine.export import (
    VARIANTS,
    ExpertLoopMoE,
    deployment_advice,
    expert_loop_model,
    export_artifacts,
    export_onnx,
    measure_latency,
    onnx_example_inputs,
    quantize_int8,
    run_onnx,
    safetensors_size_bytes,
    state_dict_size_bytes,
)
from workers.engine.generation import generate
from workers.engine.model import MoETransformer, build_model
from workers.engine.sinks import MemorySink
from workers.engine.spec import Spec, load_spec
from workers.engine.train import train

TOP_K, EXPERTS = 2, 8
PROBE_SEED = 1
BASE: dict[str, Any] = {
    "model": {
        "vocab_size": 259,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,  # grouped-query attention goes through the exporter too
        "max_seq_len": 32,
        "moe": {"num_routed_experts": EXPERTS, "num_shared_experts": 1, "top_k": TOP_K, "expert_hidden_size": 16},
    },
    "data": {"tokenizer": "bytes", "seq_len": 32, "val_fraction": 0.1},
    "training": {
        "max_steps": 4,
        "batch_size": 8,
        "eval_interval": 4,
        "eval_batches": 1,
        "checkpoint_interval": 4,
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 1},
        "seed": 3,
    },
}


def make_spec(**model: Any) -> Spec:
    return merged_spec(BASE, model=model)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained checkpoint whose routers send a batch of random tokens to every expert.

    A few training steps can leave a tiny model routing most tokens of a layer to a few experts (measured:
    2-3 of 8 in the upper layer at lr 1e-2), so that no input reaches them all. Here DeepSeek-V3's own remedy,
    the aux-free selection bias, is applied until the probe batch reaches every expert (5 updates with these
    seeds), and the model is saved as a checkpoint of the same run.
    """
    root = tmp_path_factory.mktemp("run")
    corpus = write_letters_corpus(root / "letters.jsonl", documents=100)
    spec = make_spec()
    result = train(spec, corpus, root / "run", MemorySink())
    assert result.status == "completed" and result.checkpoint is not None
    model = load_for_inference(result.checkpoint).model
    probe = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(PROBE_SEED))
    for _ in range(50):
        if all(len(hit) == EXPERTS for hit in routed_experts(model, probe)):
            break
        with torch.no_grad():
            model.train()(probe)  # training-mode forwards count the router's choices for the bias update
        for layer in model.moe_layers:
            layer.router.update_bias(0.01)
        model.eval()
    else:
        pytest.fail("the router biases did not spread the probe batch over every expert")
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(
        root / "run" / "rerouted",
        result.step,
        model=model,
        optimizer=optimizer,
        spec=spec,
        loop_state={},
        data_state={},
    )


@pytest.fixture(scope="module")
def artifacts(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_artifacts(checkpoint, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> MoETransformer:
    return load_for_inference(checkpoint).model


def routed_experts(model: MoETransformer, input_ids: torch.Tensor) -> list[set[int]]:
    """Per MoE layer, the routed experts that received at least one token (from the model's recorded load)."""
    with torch.no_grad():
        load = model(input_ids).expert_load  # (layers, E)
    return [set(torch.flatten(torch.nonzero(row)).tolist()) for row in load]


def max_abs_diff(model: MoETransformer, onnx_path: Path, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(input_ids).logits.numpy()
    got = run_onnx(onnx_path, input_ids.numpy())
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


# --------------------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------------------


def test_export_artifacts_writes_every_file(checkpoint: Path, artifacts: dict[str, Path]) -> None:
    assert set(artifacts) == {"model.safetensors", "tokenizer.json", "spec.json", "model.onnx"}
    manifest = verify_checkpoint(checkpoint)
    weights = artifacts["model.safetensors"].read_bytes()
    assert hashlib.sha256(weights).hexdigest() == manifest["files"]["model.safetensors"]["sha256"]
    assert load_spec(json.loads(artifacts["spec.json"].read_text())) == make_spec()
    run_tokenizer = load_tokenizer(checkpoint.parent.parent / "data" / "tokenizer.json")  # <run>/data
    assert load_tokenizer(artifacts["tokenizer.json"]).to_str() == run_tokenizer.to_str()
    graph = onnx.load(str(artifacts["model.onnx"])).graph
    assert [i.name for i in graph.input] == ["input_ids"] and [o.name for o in graph.output] == ["logits"]
    # Both axes are symbolic, not the example's sizes.
    dims = graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param and not d.dim_value for d in dims)
    assert not any(p.key == "pkg.torch.onnx.stack_trace" for n in graph.node for p in n.metadata_props)
    assert not list(artifacts["model.onnx"].parent.glob(".*.tmp"))


# --------------------------------------------------------------------------------------------------------
# ONNX keeps every expert
# --------------------------------------------------------------------------------------------------------


def test_expert_loop_model_has_the_same_numerics(model: MoETransformer) -> None:
    ids = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    loop = expert_loop_model(model)
    assert all(isinstance(layer, ExpertLoopMoE) for layer in loop.moe_layers)
    assert not any(isinstance(layer, ExpertLoopMoE) for layer in model.moe_layers)  # the original is untouched
    with torch.no_grad():
        a, b = model(ids), loop(ids)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.expert_load, a.expert_load)


def test_onnx_matches_pytorch_on_input_that_reaches_every_expert(
    model: MoETransformer, artifacts: dict[str, Path]
) -> None:
    # An input that reaches every routed expert of every MoE layer (checked on the model's recorded load).
    ids = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(PROBE_SEED))
    assert all(len(hit) == EXPERTS for hit in routed_experts(model, ids))
    diff = max_abs_diff(model, artifacts["model.onnx"], ids)
    assert diff <= 1e-4, diff


def test_onnx_matches_on_inputs_routed_elsewhere_than_the_export_example(
    model: MoETransformer, artifacts: dict[str, Path]
) -> None:
    example = onnx_example_inputs(model)["input_ids"]
    seen = routed_experts(model, example)
    # The example routes every token alike: exactly top_k experts per layer, the others never ran in it.
    assert [len(hit) for hit in seen] == [TOP_K] * len(seen)
    # A one-token input whose experts differ from the example's in some layer: a graph pruned to the
    # example's experts would get it wrong.
    for token in range(259):
        ids = torch.full((1, 5), token, dtype=torch.long)
        hit = routed_experts(model, ids)
        if any(h - s for h, s in zip(hit, seen, strict=True)):
            break
    else:
        pytest.fail("every token routes like the example")
    assert max_abs_diff(model, artifacts["model.onnx"], ids) <= 1e-4
    # Other batch and sequence lengths, one token included, and the longest sequence allowed.
    for shape in [(3, 17), (1, 1), (2, 32)]:
        ids = torch.randint(0, 259, shape, generator=torch.Generator().manual_seed(sum(shape)))
        assert max_abs_diff(model, artifacts["model.onnx"], ids) <= 1e-4, shape


def test_onnx_classification_with_padding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = build_model(make_spec(task="classification", num_labels=3, num_layers=1)).eval()  # a quicker export
    path = export_onnx(classifier, tmp_path / "classifier.onnx")
    ids = torch.randint(0, 259, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # pads on the right: the pooled position moves
    mask[2, 3:] = 0
    with torch.no_grad():
        expected = classifier(ids, attention_mask=mask).logits.numpy()
    got = run_onnx(path, ids.numpy(), mask.numpy())
    assert got.shape == (3, 3)
    assert float(np.abs(got - expected).max()) <= 1e-4


# --------------------------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------------------------


def test_int8_is_close_and_smaller(model: MoETransformer) -> None:
    int8 = quantize_int8(model)
    layer = int8.moe_layers[0]
    assert isinstance(layer, ExpertLoopMoE)
    assert all(isinstance(m, DynamicQuantizedLinear) for m in [*layer.experts_in, *layer.experts_out])
    assert isinstance(int8.blocks[0].attn.qkv, DynamicQuantizedLinear)
    ids = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = model(ids).logits, int8(ids).logits
    # Loose bound: int8 weights with per-tensor scales move logits by ~1 % of their range on this model.
    assert float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9
    assert state_dict_size_bytes(int8) < safetensors_size_bytes(model)


def test_int8_keeps_an_untied_output_head_in_fp32_and_generates() -> None:
    torch.manual_seed(0)
    untied = build_model(make_spec(tie_embeddings=False)).eval()
    int8 = quantize_int8(untied)
    assert type(int8.lm_head) is nn.Linear  # the model reads the head's weight directly
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got = untied(ids).logits, int8(ids).logits
    assert float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    assert generate(int8, ids[:, :4], 5, temperature=0.0).shape == (2, 9)


def test_an_mla_model_with_mtp_exports_to_onnx_and_int8_and_generates_from_its_compressed_cache(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    mla = {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6}
    model = build_model(make_spec(attention="mla", num_kv_heads=None, mla=mla, mtp_depth=1, num_layers=1)).eval()
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(5))
    path = export_onnx(model, tmp_path / "mla.onnx")  # the logits only: no MTP module in the graph
    assert max_abs_diff(model, path, ids) <= 1e-4
    int8 = quantize_int8(model)
    assert type(int8.blocks[0].attn.kv_up) is nn.Linear  # cached decoding reads its weight as a matrix
    with torch.no_grad():
        ref, got = model(ids).logits, int8(ids).logits
    assert float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    assert generate(int8, ids[:, :4], 5, temperature=0.0).shape == (2, 9)


# --------------------------------------------------------------------------------------------------------
# Latency and advice
# --------------------------------------------------------------------------------------------------------


def test_latency_report_measures_every_variant(model: MoETransformer, artifacts: dict[str, Path]) -> None:
    report = measure_latency(
        model, onnx_path=artifacts["model.onnx"], batch_sizes=(1, 4), seq_len=16, repeats=3, warmup=1, threads=1
    )
    json.dumps(report, allow_nan=False)
    assert report["settings"]["seq_len"] == 16 and report["settings"]["threads"] == 1
    assert set(report["variants"]) == set(VARIANTS)
    for variant in report["variants"].values():
        assert variant["size_bytes"] > 0
        assert [row["batch_size"] for row in variant["latency"]] == [1, 4]
        for row in variant["latency"]:
            assert 0 < row["median_ms"] <= row["p90_ms"]
            assert row["tokens_per_s"] == pytest.approx(row["batch_size"] * 16 / (row["median_ms"] / 1000))
    assert report["variants"]["onnxruntime_fp32"]["size_bytes"] == artifacts["model.onnx"].stat().st_size
    assert torch.get_num_threads() == 1  # restored
    advice = deployment_advice(report, targets_ms=(1e-6, 1e6))
    assert advice[0]["variant"] is None and advice[1]["variant"] in VARIANTS
    with pytest.raises(ValueError, match="seq_len"):
        measure_latency(model, onnx_path=artifacts["model.onnx"], seq_len=33)


def fake_report(onnx_size: int = 1100) -> dict[str, Any]:
    """Figures chosen so that each target has one right answer (seq_len 64; tokens/s = 64 * batch / median)."""

    def variant(label: str, size: int, rows: list[tuple[int, float, float]]) -> dict[str, Any]:
        latency = [
            {"batch_size": b, "median_ms": med, "p90_ms": p90, "tokens_per_s": b * 64 / (med / 1000)}
            for b, med, p90 in rows
        ]
        return {"label": label, "size_bytes": size, "latency": latency}

    return {
        "settings": {"batch_sizes": [1, 8], "seq_len": 64},
        "variants": {
            # batch 1: 10,667 tokens/s (p90 7 ms); batch 8: 25,600 tokens/s (p90 45 ms)
            "pytorch_fp32": variant("PyTorch fp32", 1000, [(1, 6.0, 7.0), (8, 20.0, 45.0)]),
            # batch 1: 8,000 (p90 9 ms); batch 8: 20,480 (p90 40 ms)
            "pytorch_int8": variant("PyTorch int8 (dynamic)", 400, [(1, 8.0, 9.0), (8, 25.0, 40.0)]),
            # batch 1: 16,000 (p90 5 ms); batch 8: 8,533 (p90 70 ms)
            "onnxruntime_fp32": variant("ONNX Runtime fp32", onnx_size, [(1, 4.0, 5.0), (8, 60.0, 70.0)]),
        },
    }


def test_advice_picks_the_fastest_variant_that_meets_each_target() -> None:
    advice = deployment_advice(fake_report(), targets_ms=(2, 5, 8, 42, 50, 100))
    assert [(a["target_ms"], a["variant"], a["batch_size"]) for a in advice] == [
        (2, None, None),  # no p90 within 2 ms
        (5, "onnxruntime_fp32", 1),  # the only point within 5 ms
        (8, "onnxruntime_fp32", 1),  # PyTorch fp32 at batch 1 fits too, but is slower
        (42, "pytorch_int8", 8),  # int8 at batch 8 fits (40 ms) and its 20,480 tokens/s beat every batch-1 point
        (50, "pytorch_fp32", 8),  # fp32 at batch 8 fits now (45 ms): 25,600 tokens/s
        (100, "pytorch_fp32", 8),  # ONNX Runtime at batch 8 fits too, but is slower
    ]
    assert advice[0]["reason"].startswith("No variant meets 2 ms: the fastest, ONNX Runtime fp32, takes 5.0 ms")
    # Reasons are computed from the figures: batch-1 medians 4 / 6 / 8 ms, sizes 1100 / 1000 / 400 bytes.
    reason = advice[1]["reason"]
    assert reason.startswith("ONNX Runtime fp32 at batch 1: p90 5.0 ms (median 4.0 ms) is within 5 ms at 16,000")
    assert "PyTorch fp32 takes 6.0 ms at batch 1 (1.5× slower) and is 0.91× the size" in reason
    assert "PyTorch int8 (dynamic) takes 8.0 ms at batch 1 (2.0× slower) and is 0.36× the size" in reason
    assert "ONNX Runtime fp32 takes 4.0 ms at batch 1 (2.0× faster)" in advice[3]["reason"]
    assert advice[4]["tokens_per_s"] == pytest.approx(25_600) and advice[4]["size_bytes"] == 1000


def test_advice_breaks_ties_by_size() -> None:
    report = fake_report()
    twin = copy.deepcopy(report["variants"]["onnxruntime_fp32"])
    report["variants"]["onnxruntime_fp32"]["size_bytes"] = 300  # as fast as before, now the smallest
    report["variants"]["twin"] = {**twin, "label": "twin"}
    assert deployment_advice(report, targets_ms=(5,))[0]["variant"] == "onnxruntime_fp32"
    report["variants"]["twin"]["size_bytes"] = 200
    assert deployment_advice(report, targets_ms=(5,))[0]["variant"] == "twin"
