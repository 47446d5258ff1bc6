"""Hugging Face export and import (workers/engine/hf.py) against the real transformers classes, on tiny random models
in fp32: every family loads with ``from_pretrained`` and computes the engine's logits; export → import → export
writes the same bytes; what no family expresses, and what the engine cannot take in, is refused by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from workers.engine.data import build_byte_tokenizer
from workers.engine.hf import (
    ARCHITECTURES,
    HFImportError,
    NotExpressible,
    derived_spec,
    engine_state_from_folder,
    hf_family,
    load_hf_weights,
    read_hf_folder,
    reexport_folder,
    write_hf_folder,
)
from workers.engine.model import MoETransformer, build_model
from workers.engine.sinks import MemorySink
from workers.engine.spec import Spec
from workers.engine.train import train

VOCAB, SEQ, BATCH = 300, 32, 4
MOE = {"num_routed_experts": 8, "top_k": 2, "expert_hidden_size": 16, "first_dense_layers": 1}
BASE = {"vocab_size": VOCAB, "hidden_size": 32, "num_heads": 4, "num_layers": 3, "max_seq_len": 64}
MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}

# One spec per family, each with the choices its conversion has to carry: group-limited routing, a routed scaling
# factor, a router temperature, GQA, untied embeddings, no shared experts.
FAMILY_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "deepseek_v3 (MLA, groups, scaling, temperature)": (
        "deepseek_v3",
        {
            "attention": "mla",
            "mla": MLA,
            "moe": {**MOE, "scoring": "sigmoid", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                    "router_temperature": 0.7},
        },
    ),
    "deepseek_v3 (direct queries, no shared experts)": (
        "deepseek_v3",
        {"attention": "mla", "mla": {**MLA, "q_lora_rank": 0},
         "moe": {**MOE, "scoring": "sigmoid", "num_shared_experts": 0}},
    ),
    "deepseek_v2 (MLA, softmax, groups, scaling)": (
        "deepseek_v2",
        {"attention": "mla", "mla": MLA,
         "moe": {**MOE, "balancing": "aux_loss", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.5}},
    ),
    "glm4_moe (GQA, 2 shared, untied)": (
        "glm4_moe",
        {"attention": "gqa", "num_kv_heads": 2, "tie_embeddings": False,
         "moe": {**MOE, "scoring": "sigmoid", "num_shared_experts": 2}},
    ),
    "qwen2_moe (softmax, scaling)": (
        "qwen2_moe", {"moe": {**MOE, "balancing": "aux_loss", "routed_scaling_factor": 1.5}}
    ),
    "qwen2_moe (no shared experts)": (
        "qwen2_moe", {"moe": {**MOE, "balancing": "aux_loss", "num_shared_experts": 0}}
    ),
}  # fmt: skip


def _spec(model: dict[str, Any]) -> Spec:
    return Spec.model_validate({"model": {**BASE, **model}, "data": {"seq_len": SEQ, "tokenizer": "bytes"}})


def _random_model(spec: Spec, seed: int = 0) -> MoETransformer:
    """A tiny model whose routers are sharp (spread routing) and, for sigmoid families, with non-zero
    selection biases (so the bias's export is tested)."""
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.weight.normal_(0.0, 0.3)
            if spec.model.moe.scoring == "sigmoid":
                layer.router.bias.normal_(0.0, 0.05)
    return model


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_byte_tokenizer().save(str(path))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(FAMILY_SPECS))
def test_each_family_loads_with_from_pretrained_and_gives_the_engines_logits_on_inputs_that_reach_every_expert(
    case: str, tmp_path: Path, tokenizer_file: Path
) -> None:
    family, model_fields = FAMILY_SPECS[case]
    spec = _spec(model_fields)
    assert hf_family(spec.model) == family
    model = _random_model(spec)
    ids = _inputs()
    with torch.no_grad():
        out = model(ids)
    # Every routed expert of every MoE layer processes some of these tokens, so every expert's weights matter.
    assert out.expert_load.shape == (spec.model.num_moe_layers, 8)
    assert bool((out.expert_load > 0).all()), out.expert_load

    export = write_hf_folder(spec.model, model.state_dict(), tmp_path, tokenizer=tokenizer_file)
    assert export.family == family and export.architecture == ARCHITECTURES[family]
    loaded: Any = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    hf, info = loaded
    assert type(hf).__name__ == ARCHITECTURES[family]
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor: nothing left at random
    with torch.no_grad():
        hf_logits = hf.eval()(ids).logits
    delta = (hf_logits - out.logits).abs().max().item()
    print(f"\n{case}: max |Δlogit| = {delta:.3g} over {ids.numel()} tokens (logits up to {out.logits.abs().max():.3g})")
    assert delta < 1e-4

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.eos_token == "<eos>" and tok("hi")["input_ids"] == [ord("h"), ord("i")]


@pytest.mark.parametrize(
    ("model_fields", "field"),
    [
        ({"norm": "layernorm"}, "model.norm"),
        ({"activation": "gelu"}, "model.activation"),
        ({"task": "classification", "num_labels": 3}, "model.task"),
        ({"moe": {**MOE, "balancing": "aux_free"}}, "model.moe.balancing"),
        ({"attention": "mla", "mla": MLA, "moe": {**MOE}}, "model.moe.balancing"),
        ({"moe": {**MOE, "balancing": "aux_loss", "n_group": 4, "topk_group": 2}}, "model.moe.n_group"),
        ({"attention": "mla", "mla": MLA, "norm_eps": 1e-5, "moe": {**MOE, "scoring": "sigmoid"}}, "model.norm_eps"),
        ({"moe": {**MOE, "scoring": "sigmoid", "n_group": 8, "topk_group": 2}}, "model.moe.n_group"),
    ],
)
def test_a_spec_no_family_expresses_is_refused_naming_the_field(
    model_fields: dict[str, Any], field: str, tmp_path: Path
) -> None:
    spec = _spec(model_fields)
    with pytest.raises(NotExpressible) as refused:
        write_hf_folder(spec.model, build_model(spec).state_dict(), tmp_path / "out")
    assert refused.value.field == field
    assert not (tmp_path / "out").exists()  # refused before writing anything


@pytest.mark.parametrize("case", list(FAMILY_SPECS))
def test_export_import_export_writes_the_same_bytes(case: str, tmp_path: Path, tokenizer_file: Path) -> None:
    spec = _spec(FAMILY_SPECS[case][1])
    model = _random_model(spec)
    first = write_hf_folder(spec.model, model.state_dict(), tmp_path / "first", tokenizer=tokenizer_file)
    second = reexport_folder(tmp_path / "first", tmp_path / "second")
    assert sorted(first.files) == sorted(second.files)
    for name in first.files:
        assert _sha(first.files[name]) == _sha(second.files[name]), name

    # The imported weights are the engine's weights (up to the exact folds: temperature, the Qwen gate's 1/2).
    folder = read_hf_folder(tmp_path / "first")
    imported = build_model(Spec.model_validate(derived_spec(folder))).eval()
    load_hf_weights(imported, tmp_path / "first")
    ids = _inputs(2)
    with torch.no_grad():
        assert (imported(ids).logits - model(ids).logits).abs().max().item() < 1e-4


def test_a_deepseek_checkpoint_in_transformers_own_layout_with_interleaved_rope_imports_to_the_same_logits(
    tmp_path: Path,
) -> None:
    """What transformers itself saves (fused experts) for DeepSeek-V3 with ``rope_interleave: true`` (the
    published checkpoints' rotary layout) becomes an engine model computing the same logits."""
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.0, max_position_embeddings=64,
        rope_interleave=True, tie_word_embeddings=False, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8,
    )  # fmt: skip
    torch.manual_seed(3)
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "gate.weight" in name or "experts" in name:
                param.normal_(0.0, 0.3)
        for name, buf in hf.named_buffers():
            if "e_score_correction_bias" in name:
                buf.normal_(0.0, 0.05)
    hf.save_pretrained(tmp_path)
    folder = read_hf_folder(tmp_path)
    assert folder.family == "deepseek_v3"
    spec = Spec.model_validate(derived_spec(folder))
    engine = build_model(spec).eval()
    load_hf_weights(engine, tmp_path)
    ids = _inputs(3)
    with torch.no_grad():
        out = engine(ids)
        delta = (hf(ids).logits - out.logits).abs().max().item()
    assert bool((out.expert_load > 0).all())
    assert delta < 1e-4


def _valid_folder(tmp_path: Path, tokenizer_file: Path) -> Path:
    spec = _spec(FAMILY_SPECS["qwen2_moe (softmax, scaling)"][1])
    write_hf_folder(spec.model, _random_model(spec).state_dict(), tmp_path / "ok", tokenizer=tokenizer_file)
    return tmp_path / "ok"


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"qkv_bias": True}, "qkv_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"norm_topk_prob": True}, "norm_topk_prob"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope_parameters.rope_type"),
        ({"mlp_only_layers": [1]}, "mlp_only_layers"),
    ],
)
def test_a_config_the_engine_cannot_represent_is_refused_naming_its_key(
    change: dict[str, Any], field: str, tmp_path: Path, tokenizer_file: Path
) -> None:
    folder = _valid_folder(tmp_path, tokenizer_file)
    _edit_config(folder, **change)
    with pytest.raises(HFImportError) as refused:
        read_hf_folder(folder)
    assert refused.value.field == field


def test_pickles_and_unknown_files_are_refused_by_name_and_never_opened(tmp_path: Path, tokenizer_file: Path) -> None:
    folder = _valid_folder(tmp_path, tokenizer_file)
    for name in ("pytorch_model.bin", "optimizer.pt", "tokenizer.model", "model-00001-of-00002.safetensors"):
        bad = folder / name
        bad.write_bytes(b"\x80\x04K\x01.")  # a pickle: would run code if unpickled
        with pytest.raises(HFImportError) as refused:
            read_hf_folder(folder)
        assert refused.value.field == name
        bad.unlink()
    (folder / "config.json").unlink()
    with pytest.raises(HFImportError) as refused:
        read_hf_folder(folder)
    assert refused.value.field == "config.json"


def test_weights_that_disagree_with_the_config_are_refused_naming_the_tensor(
    tmp_path: Path, tokenizer_file: Path
) -> None:
    folder = _valid_folder(tmp_path, tokenizer_file)
    tensors = load_file(str(folder / "model.safetensors"))
    # A learned Qwen shared-expert gate: the engine's shared experts are ungated.
    gate = "model.layers.1.mlp.shared_expert_gate.weight"
    tensors[gate] = torch.ones_like(tensors[gate])
    save_file(tensors, str(folder / "model.safetensors"))
    spec = Spec.model_validate(derived_spec(read_hf_folder(folder)))
    with pytest.raises(HFImportError) as refused:
        engine_state_from_folder(read_hf_folder(folder), spec.model)
    assert refused.value.field == gate
    # A tensor of the wrong shape.
    tensors[gate] = torch.zeros_like(tensors[gate])
    name = "model.layers.2.self_attn.o_proj.weight"
    tensors[name] = torch.zeros(32, 16)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(HFImportError) as refused:
        engine_state_from_folder(read_hf_folder(folder), spec.model)
    assert refused.value.field == "layers.2.attn.out.weight"
    # Not a safetensors file at all.
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HFImportError) as refused:
        engine_state_from_folder(read_hf_folder(folder), spec.model)
    assert refused.value.field == "model.safetensors"


def test_a_run_starts_from_an_imported_folder_keeps_its_tokenizer_and_its_step_0_exports_to_the_same_bytes(
    tmp_path: Path, tokenizer_file: Path
) -> None:
    """Continued pre-training: the weights are loaded before step 0 (so the step-0 checkpoint exports to the very
    folder it came from), the data is tokenized with the folder's tokenizer, and training moves the loss."""
    spec = _spec(FAMILY_SPECS["glm4_moe (GQA, 2 shared, untied)"][1])
    write_hf_folder(spec.model, _random_model(spec).state_dict(), tmp_path / "folder", tokenizer=tokenizer_file)
    folder = read_hf_folder(tmp_path / "folder")
    derived = derived_spec(folder)
    job = Spec.model_validate(
        {
            **derived,
            "model": {**derived["model"], "mtp_depth": 1},  # a new MTP module on an imported trunk: fresh weights
            "training": {"batch_size": 4, "max_steps": 6, "checkpoint_interval": 100, "eval_interval": 100,
                         "schedule": {"warmup_steps": 1}, "optimizer": {"lr": 3e-3}},
            "data": {**derived["data"], "seq_len": 32, "tokenizer": "bpe", "val_fraction": 0.2},
        }
    )  # fmt: skip
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"document {i}: the routed experts see tokens {i % 7} and {i % 5}." for i in range(40))
    )
    sink = MemorySink()
    result = train(job, corpus, tmp_path / "run", sink, device="cpu", init_from=tmp_path / "folder")
    assert result.status == "completed"
    (event,) = sink.events_of("initialised")
    assert event["from"] == "folder" and event["fresh_parameters"] > 0  # the MTP module's
    # The bytes tokenizer of the folder, not a BPE trained on the corpus (which data.tokenizer asks for).
    prepared = tmp_path / "run" / "data"
    used, given = (Tokenizer.from_file(str(p)) for p in (prepared / "tokenizer.json", tokenizer_file))
    assert used.get_vocab() == given.get_vocab() and used.encode("document 7").ids == list(b"document 7")
    assert json.loads((prepared / "meta.json").read_text())["settings"]["tokenizer_file_sha256"] == _sha(tokenizer_file)

    step0 = tmp_path / "run" / "checkpoints" / "step-000000"
    again = write_hf_folder(job.model, load_file(str(step0 / "model.safetensors")), tmp_path / "again")
    assert _sha(again.files["model.safetensors"]) == _sha(tmp_path / "folder" / "model.safetensors")
    losses = [loss for _, loss in sink.series("loss")]
    assert losses[-1] < losses[0]
