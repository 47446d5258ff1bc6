"""The estimator against the engine: parameters exact, FLOPs and saved activations as the model really runs,
peak memory of a real CPU run within ±15%, step time within ±30% after calibration, OOM risk and its fixes.

Peak memory is measured as the peak resident set (``ru_maxrss``) of a fresh process that runs
``python -m workers.engine.calibrate`` (the training loop's own step on random batches): the whole footprint a
person sees, which the estimator's ``memory.peak`` predicts (runtime included).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from builder.configs.presets import PRESETS
from workers.engine.allocator import keep_freed_memory
from workers.engine.calibrate import TrainingSteps, measure_training
from workers.engine.estimate import (
    activation_bytes_per_token,
    count_parameters,
    estimate,
    estimate_memory,
    estimate_time,
    flops_per_token,
    suggest_memory_fixes,
)
from workers.engine.hardware import PROFILES, get_profile, profile_for_device
from workers.engine.model import MoEFeedForward, build_model
from workers.engine.spec import Spec

ROOT = Path(__file__).resolve().parents[2]


def make(model: dict[str, Any] | None = None, training: dict[str, Any] | None = None, seq: int = 64) -> Spec:
    base_model: dict[str, Any] = {
        "vocab_size": 512,
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "max_seq_len": seq,
        "moe": {"num_routed_experts": 4, "top_k": 2, "expert_hidden_size": 64},
    }
    for key, value in (model or {}).items():
        if key == "moe":
            base_model["moe"] = {**base_model["moe"], **value}
        else:
            base_model[key] = value
    return Spec.model_validate(
        {"model": base_model, "training": {"batch_size": 4, **(training or {})}, "data": {"seq_len": seq}}
    )


SHAPES = {
    "default": make(),
    "classifier": make({"task": "classification", "num_labels": 5, "dropout": 0.1}),
    "gqa-untied-dense": make({"num_kv_heads": 2, "tie_embeddings": False, "moe": {"first_dense_layers": 1}}),
    "gelu-layernorm-noshared": make({"activation": "gelu", "norm": "layernorm", "moe": {"num_shared_experts": 0}}),
    "sigmoid-many-experts": make({"moe": {"num_routed_experts": 16, "top_k": 4, "scoring": "sigmoid"}}),
    "mla-mtp": make(
        {
            "attention": "mla",
            "mla": {"q_lora_rank": 24, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                    "v_head_dim": 12},
            "mtp_depth": 2,
            "moe": {"n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5},
        }
    ),
    "mla-dense-mtp": make(
        {
            "attention": "mla",
            "mla": {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16},
            "mtp_depth": 1,
            "moe": {"first_dense_layers": 2},
        }
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SHAPES))
def test_parameters_are_exact(name: str) -> None:
    spec = SHAPES[name]
    model = build_model(spec)
    numel = sum(p.numel() for p in model.parameters())
    est = estimate(spec, get_profile("cpu"))
    assert est.parameters["total"] == numel == count_parameters(spec)
    # Active: every parameter except the routed experts a token is not sent to.
    m = spec.model
    moe_layers = [module for module in model.modules() if isinstance(module, MoEFeedForward)]  # MTP's included
    unchosen = sum((m.moe.num_routed_experts - m.moe.top_k) * (layer.w_in[0].numel() + layer.w_out[0].numel())
                   for layer in moe_layers)  # fmt: skip
    assert est.parameters["active"] == numel - unchosen


def _grouped_mm_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    if len(b_shape) == 3:  # (M, K) rows grouped by expert @ (E, K, N): each row meets one expert's matrix
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    # Weight gradient: (K, M) @ (M, N) summed within each expert's rows into (E, K, N).
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _addmm_flops(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # (M, K) @ (K, N) added into (M, N)


def _causal_attention_flops(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, **kwargs: Any) -> int:
    B, H, T, D = q_shape
    # QK^T and AV over the (T+1)/2 keys a query sees on average (MLA's values are narrower than its keys)
    return 2 * B * H * (D + v_shape[-1]) * T * (T + 1) // 2


def _causal_attention_backward_flops(
    grad_shape: Any, q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, **kwargs: Any
) -> int:
    return 2 * _causal_attention_flops(q_shape, k_shape, v_shape)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", ["default", "gqa-untied-dense", "sigmoid-many-experts", "mla-mtp", "mla-dense-mtp"])
def test_flops_match_the_operations_the_model_runs(name: str, checkpointing: bool) -> None:
    """Count every matmul the model dispatches (dense, grouped expert matmuls, attention) in forward and
    backward and compare with the estimate per token."""
    spec = SHAPES[name]
    raw = spec.model_dump()
    raw["training"]["gradient_checkpointing"] = checkpointing
    spec = Spec.model_validate(raw)
    torch.manual_seed(0)
    model = build_model(spec)
    model.train()
    B, T = spec.training.batch_size, spec.data.seq_len
    ids = torch.randint(0, spec.model.vocab_size, (B, T))
    aten = torch.ops.aten
    mapping = {
        aten._grouped_mm: _grouped_mm_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: _causal_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _causal_attention_backward_flops,
        # The fused head's backward accumulates the weight gradient in place; torch counts only out-of-place addmm.
        aten.addmm_: _addmm_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as forward_counter:
        out = model(ids, labels=ids, return_logits=False)  # as a training step calls it
    with FlopCounterMode(display=False, custom_mapping=mapping) as backward_counter:
        assert out.loss is not None
        out.loss.backward()
    predicted = flops_per_token(spec)
    tokens = B * T
    # The estimate splits the work as the maths does (backward = 2 x forward); a training step's fused head
    # (kernels.head_loss) runs the two gradient matmuls of each output head (the main one, one per MTP module)
    # in the forward already.
    m = spec.model
    head_gradients = 2 * 2 * m.vocab_size * m.hidden_size * (1 + m.mtp_depth)
    assert forward_counter.get_total_flops() / tokens == pytest.approx(predicted.forward + head_gradients, rel=1e-9)
    expected = predicted.backward + predicted.recompute - head_gradients
    assert backward_counter.get_total_flops() / tokens == pytest.approx(expected, rel=1e-9)
    assert (predicted.recompute > 0) == checkpointing


def saved_activation_bytes(model: torch.nn.Module, loss: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd holds for backward (parameters and buffers excluded)."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if not (attr.startswith("_saved_") or attr == "saved_tensors"):
                continue
            try:
                value = getattr(node, attr)
            except Exception:  # some saved slots are not readable (e.g. freed optional tensors)
                continue
            for tensor in value if isinstance(value, tuple | list) else [value]:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in owned:
                        seen[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(seen.values())


@pytest.mark.parametrize("name", list(SHAPES))
def test_saved_activations_match_the_model(name: str) -> None:
    """What the estimator counts per token is what the model's forward keeps for backward (fp32)."""
    spec = SHAPES[name]
    torch.manual_seed(0)
    model = build_model(spec)
    model.train()
    B, T = spec.training.batch_size, spec.data.seq_len
    ids = torch.randint(0, spec.model.vocab_size, (B, T))
    labels = torch.randint(0, spec.model.num_labels or 2, (B,)) if spec.model.task == "classification" else ids
    out = model(ids, labels=labels, return_logits=False)  # as a training step calls it
    assert out.loss is not None
    measured = saved_activation_bytes(model, out.loss)
    a = activation_bytes_per_token(spec)
    m = spec.model
    dense = m.num_layers - m.num_moe_layers
    mtp = m.mtp_depth * (a.mtp_outside_block + a.mtp_block)
    predicted = B * T * (m.num_layers * a.attention + m.num_moe_layers * a.moe + dense * a.dense + a.head + mtp)
    assert measured == pytest.approx(predicted, rel=0.05)


def _measure_in_a_fresh_process(spec: Spec, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.engine.calibrate",
            str(path),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


MEMORY_CASES = {
    # Weights, gradients and AdamW state dominate: 16 experts of a 256-wide model, a small batch.
    "parameter-heavy": make(
        {"vocab_size": 4096, "num_layers": 4, "hidden_size": 256, "max_seq_len": 128,
         "moe": {"num_routed_experts": 16, "expert_hidden_size": 256}},
        {"batch_size": 4},
        seq=128,
    ),
    # Activations dominate: a narrow model on 8k tokens per micro-batch.
    "activation-heavy": make(
        {"vocab_size": 2048, "num_layers": 2, "hidden_size": 128, "max_seq_len": 512,
         "moe": {"expert_hidden_size": 128}},
        {"batch_size": 16},
        seq=512,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MEMORY_CASES))
def test_peak_memory_of_a_real_cpu_run_is_within_15_percent(name: str, tmp_path: Path) -> None:
    spec = MEMORY_CASES[name]
    measured = _measure_in_a_fresh_process(spec, tmp_path)["process_peak_bytes"]
    predicted = estimate_memory(spec, get_profile("cpu")).peak
    assert abs(predicted - measured) <= 0.15 * measured, (
        f"predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
    )


def test_step_time_is_within_30_percent_after_calibration() -> None:
    """Calibrate the CPU profile with the tiny demo template (what the calibration endpoint runs by default),
    then predict a different shape (wider, deeper, 1.5 × the tokens per step) and measure it.

    The machine is shared, so the two are timed in alternation, one step each in turn, and compared by their
    fastest steps (the least disturbed by other processes); the calibration uses the same statistic.
    """
    calibration_spec = PRESETS["tiny-cpu-demo"].spec
    raw = calibration_spec.model_dump()
    raw["model"].update(num_layers=3, hidden_size=192, num_heads=6)
    raw["model"]["moe"]["expert_hidden_size"] = 192
    raw["training"]["batch_size"] = 12
    other = Spec.model_validate(raw)
    cpu = get_profile("cpu")
    times: dict[str, list[float]] = {"calibration": [], "other": []}
    with keep_freed_memory():  # as training and calibration run
        runs = {
            "calibration": TrainingSteps(calibration_spec, torch.device("cpu")),
            "other": TrainingSteps(other, torch.device("cpu")),
        }
        for run in runs.values():
            run.step()  # warm up: first-use allocations and kernel selection
        for _ in range(16):  # enough rounds that each shape has some steps undisturbed by other processes
            for name, run in runs.items():
                times[name].append(run.step())
    factor = min(times["calibration"]) / estimate_time(calibration_spec, cpu).step_seconds
    predicted = estimate_time(other, cpu, calibration=factor).step_seconds
    measured = min(times["other"])
    assert abs(predicted - measured) <= 0.30 * measured, f"predicted {predicted:.3f}s, measured {measured:.3f}s"


def _apply(spec: Spec, changes: dict[str, Any]) -> Spec:
    raw = spec.model_dump()
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[leaf] = value
    return Spec.model_validate(raw)


def _moe(vocab: int, layers: int, width: int, seq: int, batch: int, **training: Any) -> Spec:
    return Spec.model_validate(
        {
            "model": {"vocab_size": vocab, "num_layers": layers, "hidden_size": width, "num_heads": 4,
                      "max_seq_len": seq, "moe": {"num_routed_experts": 8, "top_k": 2, "expert_hidden_size": width}},
            "training": {"batch_size": batch, **training},
            "data": {"seq_len": seq},
        }
    )  # fmt: skip


def test_out_of_memory_risk_comes_with_the_change_that_fixes_it() -> None:
    t4 = get_profile("t4")
    # 16 layers: with 12 the first halving already fits, since a training step keeps no (N, V) logits.
    big = _moe(32768, 16, 1024, 1024, 64)
    est = estimate(big, t4)
    assert est.risk.level == "will_not_fit" and "Will not fit" in est.risk.message
    fixes = est.risk.fixes
    # Checkpointing first (the cheapest in speed), then a lower precision (the T4 has no bf16, so fp16), then
    # halving the micro-batch while doubling accumulation.
    assert fixes[0].changes == {"training.gradient_checkpointing": True}
    assert fixes[1].changes == {"training.gradient_checkpointing": True, "training.precision": "fp16"}
    batches = [f.changes["training.batch_size"] for f in fixes[2:]]
    assert batches == [32, 16]
    assert all(f.changes["training.batch_size"] * f.changes["training.grad_accum_steps"] == 64 for f in fixes[2:])
    # Every step lowers the peak; only the last fits, and applying its changes really fits.
    assert [f.peak for f in fixes] == sorted((f.peak for f in fixes), reverse=True)
    assert fixes[-1].level == "fits" and all(f.level != "fits" for f in fixes[:-1])
    assert estimate(_apply(big, fixes[-1].changes), t4).risk.level == "fits"
    assert "Fix: training.gradient_checkpointing = True; training.precision = fp16; training.batch_size = 16" in (
        est.risk.message
    )
    # With checkpointing already on, a lower precision alone can be enough (long sequences).
    long = _moe(1024, 2, 256, 4096, 128, gradient_checkpointing=True)
    fixes = estimate(long, t4).risk.fixes
    assert fixes[0].changes == {"training.precision": "fp16"} and fixes[0].peak < estimate(long, t4).memory.peak
    assert fixes[-1].level == "fits"
    # Nothing helps enough: the last attempt does not fit, and the message says what else to do.
    hopeless = estimate(_moe(4096, 32, 2048, 4096, 8), t4)
    assert hopeless.risk.fixes[-1].level == "will_not_fit" and "smaller model" in hopeless.risk.message
    # A spec that fits needs no fix; a peak between 85% and 100% of the device is "tight".
    assert estimate(make(), t4).risk.fixes == []
    tight = [f for f in estimate(big, t4).risk.fixes if f.level == "tight"]
    assert tight and all(0.85 * t4.memory_bytes < f.peak <= t4.memory_bytes for f in tight)


def test_memory_table_and_expert_imbalance() -> None:
    spec = make({"moe": {"num_routed_experts": 8, "top_k": 2}}, {"batch_size": 8})
    a100 = get_profile("a100-80gb")
    est = estimate(spec, a100)
    table = {(r["precision"], r["checkpointing"]): r for r in est.memory_table}
    assert len(table) == 6 and all(r["supported"] for r in table.values())
    assert table[("bf16", False)]["activations"] < table[("fp32", False)]["activations"]
    assert table[("fp32", True)]["activations"] < table[("fp32", False)]["activations"]
    # One device, or data parallel: every device holds every expert; imbalance changes nothing.
    assert est.memory.worst_case_peak == est.memory.peak and est.memory.imbalance_factor == 1.0
    ddp = estimate(spec, a100, num_gpus=4)
    assert ddp.memory.imbalance_factor == 1.0
    # Experts sharded over 4 GPUs: the busiest GPU can receive every token's rows for its 2 experts.
    ep = estimate(spec, a100, num_gpus=4, parallelism="expert")
    assert ep.memory.imbalance_factor == pytest.approx(4.0)
    assert ep.memory.worst_case_peak > ep.memory.peak and ep.time.worst_case_step_seconds > ep.time.step_seconds
    assert ep.parameters["per_device"] < ep.parameters["total"]
    capped = make({"moe": {"num_routed_experts": 8, "top_k": 2, "capacity_factor": 1.25}}, {"batch_size": 8})
    assert estimate(capped, a100, num_gpus=4, parallelism="expert").memory.imbalance_factor == pytest.approx(1.25)
    # batch_size is the global micro-batch: 4 GPUs share it, so a step has the same tokens and takes less time.
    assert ddp.time.tokens_per_step == est.time.tokens_per_step
    assert ddp.time.step_seconds < est.time.step_seconds and ddp.memory.activations < est.memory.activations
    cpu = get_profile("cpu")
    with pytest.raises(ValueError, match="num_gpus"):
        estimate(spec, cpu, num_gpus=cpu.max_devices + 1)


def test_calibration_multiplies_times_and_fixes_can_be_suggested_directly() -> None:
    spec = make()
    cpu = get_profile("cpu")
    plain = estimate_time(spec, cpu)
    doubled = estimate_time(spec, cpu, calibration=2.0)
    assert doubled.step_seconds == pytest.approx(2 * plain.step_seconds)
    assert doubled.tokens_per_second == pytest.approx(plain.tokens_per_second / 2)
    assert suggest_memory_fixes(spec, cpu) == []


def test_hardware_profiles() -> None:
    assert set(PROFILES) == {"cpu", "t4", "a10", "a100-40gb", "a100-80gb", "h100-80gb"}
    for profile in PROFILES.values():
        assert profile.peak_flops["fp32"] and profile.memory_bytes > 0 and 0 < profile.efficiency <= 1
    assert not PROFILES["t4"].supports("bf16") and PROFILES["t4"].supports("fp16")
    assert not PROFILES["cpu"].supports("fp16")
    assert profile_for_device("cuda", "NVIDIA A100-SXM4-80GB") is PROFILES["a100-80gb"]
    assert profile_for_device("cuda", "NVIDIA A100-PCIE-40GB") is PROFILES["a100-40gb"]
    assert profile_for_device("cuda", "NVIDIA A10") is PROFILES["a10"]
    assert profile_for_device("cuda", "NVIDIA H100 80GB HBM3") is PROFILES["h100-80gb"]
    assert profile_for_device("cuda", "Tesla T4") is PROFILES["t4"]
    assert profile_for_device("cuda", "Radeon") is None
    assert profile_for_device("cpu") is PROFILES["cpu"]
    with pytest.raises(KeyError, match="known"):
        get_profile("tpu")


def test_a_timed_run_reports_its_device_and_steps() -> None:
    result = measure_training(make(), steps=2, warmup=0)
    assert result.device == "cpu" and result.hardware == "cpu" and result.steps == 2
    assert len(result.step_times) == 2 and result.min_step_seconds <= result.step_seconds
    assert result.tokens_per_step == 4 * 64 and result.peak_bytes >= 0
    assert statistics.median(result.step_times) == result.step_seconds


def test_the_measured_peak_is_the_run_s_own_not_its_parent_s() -> None:
    """ru_maxrss survives exec: a child of a large process (pytest after many tests) would report the parent's
    size. The measurement reads the child's own high-water mark."""
    parent = bytearray(1536 * 2**20)
    for i in range(0, len(parent), 4096):
        parent[i] = 1  # touched: resident in this process, so ru_maxrss of a fork would be at least this
    done = subprocess.run(
        [sys.executable, "-c", "from workers.engine.calibrate import _rss_peak_bytes; print(_rss_peak_bytes())"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    del parent
    assert int(done.stdout) < 1024 * 2**20, int(done.stdout) / 2**20
