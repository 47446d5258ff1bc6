"""Lint: each rule of thumb fires on its mistake, names the field, says why and what to change; a sound spec
gets no warning."""

from __future__ import annotations

from typing import Any

import pytest

from builder.configs.presets import PRESETS
from workers.engine import lint as lint_module
from workers.engine.hardware import get_profile
from workers.engine.lint import (
    RULES,
    LintContext,
    lint,
    lint_raw,
    spec_ignoring_cross_field_rules,
    typical_learning_rate,
)
from workers.engine.spec import Spec


def spec(**sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model": {"vocab_size": 4096, "num_layers": 4, "hidden_size": 256, "num_heads": 4, "max_seq_len": 256},
        "training": {"max_steps": 1000, "schedule": {"warmup_steps": 50}, "optimizer": {"lr": 1e-3}},
        "data": {"seq_len": 256},
    }
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict):
                raw[section][key] = {**raw[section].get(key, {}), **value}
            else:
                raw[section][key] = value
    return raw


MOE = "model.moe."
AUX_HIGH = spec(model={"moe": {"balancing": "aux_loss", "aux_loss_coef": 0.2}})
GPUS4 = {"num_gpus": 4}
T4, CPU = get_profile("t4"), get_profile("cpu")


def codes(raw: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return {a.code: a for a in lint_raw(raw, **kwargs)}


def test_a_sound_spec_gets_no_warning() -> None:
    advice = lint(Spec.model_validate(spec()), hardware=get_profile("cpu"), dataset_tokens=200_000_000)
    assert [a for a in advice if a.severity == "warning"] == []
    for name, preset in PRESETS.items():
        warnings = [a.code for a in lint(preset.spec, hardware=get_profile(preset.hardware)) if a.severity == "warning"]
        assert warnings == [], name


@pytest.mark.parametrize(
    ("raw", "code", "path", "kwargs"),
    [
        (spec(model={"hidden_size": 256, "num_heads": 6}), "heads_divide_hidden", "model.num_heads", {}),
        (spec(model={"hidden_size": 240, "num_heads": 8}), "head_dim_multiple_of_8", "model.num_heads", {}),
        (spec(model={"num_heads": 4, "num_kv_heads": 3}), "kv_heads_divide_heads", "model.num_kv_heads", {}),
        (spec(model={"moe": {"num_routed_experts": 16, "balancing": "none"}}), "balancing_off", MOE + "balancing", {}),
        (spec(model={"moe": {"num_routed_experts": 4, "top_k": 6}}), "top_k_above_experts", MOE + "top_k", {}),
        (spec(model={"moe": {"num_routed_experts": 6}}), "experts_not_divisible", MOE + "num_routed_experts", GPUS4),
        (spec(), "overfit_risk", "model.num_layers", {"dataset_tokens": 100_000}),
        (spec(), "too_many_epochs", "training.max_steps", {"dataset_tokens": 10_000}),
        (spec(training={"optimizer": {"lr": 0.02}}), "lr_high_for_size", "training.optimizer.lr", {}),
        (spec(training={"schedule": {"warmup_steps": 0}}), "no_warmup", "training.schedule.warmup_steps", {}),
        (spec(training={"grad_clip": None}), "no_grad_clip", "training.grad_clip", {}),
        (AUX_HIGH, "aux_loss_high", MOE + "aux_loss_coef", {}),
        (spec(model={"moe": {"capacity_factor": 0.5}}), "capacity_below_one", "model.moe.capacity_factor", {}),
        (spec(training={"eval_interval": 5000}), "never_evaluates", "training.eval_interval", {}),
        (spec(data={"seq_len": 512}), "seq_len_above_max", "data.seq_len", {}),
        (spec(training={"precision": "bf16"}), "precision_unsupported", "training.precision", {"hardware": T4}),
        (spec(training={"precision": "fp16"}), "precision_unsupported", "training.precision", {"hardware": CPU}),
        (spec(model={"moe": {"num_routed_experts": 8, "n_group": 3}}), "groups_divide_experts", MOE + "n_group", {}),
        (spec(model={"moe": {"n_group": 2, "topk_group": 3}}), "topk_group_above_groups", MOE + "topk_group", {}),
        (spec(model={"moe": {"num_routed_experts": 16, "top_k": 4, "n_group": 8, "topk_group": 1}}),
         "too_few_eligible_experts", MOE + "topk_group", {}),
        (spec(model={"mtp_depth": 1}, training={"mtp_loss_weight": 0}), "mtp_weight_zero", "training.mtp_loss_weight",
         {}),
        (spec(training={"optimizer": {"name": "muon", "adjust_lr": "original", "lr": 3e-4}}), "muon_original_lr_low",
         "training.optimizer.lr", {}),
    ],
)  # fmt: skip
def test_each_warning_names_the_field_and_the_fix(raw: dict[str, Any], code: str, path: str, kwargs: Any) -> None:
    advice = codes(raw, **kwargs)
    assert code in advice, list(advice)
    item = advice[code]
    assert item.severity == "warning" and item.path == path
    assert len(item.message) > 30 and item.fix  # says why, and what to change
    if item.patch:
        # The suggested values make this warning go away.
        patched = {**raw, "model": {**raw["model"], "moe": dict(raw["model"].get("moe", {}))}}
        for dotted, value in item.patch.items():
            node = patched
            *parents, leaf = dotted.split(".")
            for key in parents:
                node[key] = dict(node[key])
                node = node[key]
            node[leaf] = value
        assert code not in codes(patched, **kwargs), item.patch


def test_information_items() -> None:
    advice = codes(spec(model={"vocab_size": 50265, "activation": "gelu"}, training={"optimizer": {"weight_decay": 0}}))
    assert advice["vocab_multiple_of_64"].patch == {"model.vocab_size": 50304}
    assert advice["prefer_swiglu"].severity == "info"
    assert advice["no_weight_decay"].severity == "info"
    # The new DeepSeek-V3 parts have reasons too: one device does not need group-limited routing, several MTP
    # modules cost more than they give, a latent as wide as full keys and values saves no cache.
    grouped = codes(spec(model={"moe": {"num_routed_experts": 16, "top_k": 2, "n_group": 4, "topk_group": 2}}))
    assert grouped["groups_on_one_device"].patch == {"model.moe.n_group": 1, "model.moe.topk_group": 1}
    assert "groups_on_one_device" not in codes(spec(model={"moe": {"n_group": 4, "topk_group": 2}}), num_gpus=4)
    assert codes(spec(model={"mtp_depth": 2}))["mtp_deep"].patch == {"model.mtp_depth": 1}
    wide = codes(spec(model={"attention": "mla", "mla": {"kv_lora_rank": 512}}))["mla_cache_not_smaller"]
    assert wide.patch == {"model.mla.kv_lora_rank": 128}
    assert "mla_cache_not_smaller" not in codes(spec(model={"attention": "mla"}))
    assert codes(spec(model={"attention": "gqa", "num_kv_heads": 4}))["gqa_is_mha"].severity == "info"
    sgd = codes(spec(training={"optimizer": {"name": "sgd", "lr": 0.5}}))
    assert sgd["sgd_for_transformer"].patch == {"training.optimizer": {"name": "adamw"}}
    assert "lr_high_for_size" not in sgd  # the AdamW table says nothing about SGD's rates
    assert "lr_high_for_size" in codes(spec(training={"optimizer": {"name": "muon", "lr": 0.02}}))
    muon_betas = codes(spec(training={"optimizer": {"name": "muon", "adamw_betas": [0.9, 0.9999]}}))
    assert muon_betas["beta2_high"].path == "training.optimizer.adamw_betas"
    classifier = spec(model={"task": "classification", "num_labels": 3})
    assert "classification_smoothing" in codes(classifier)
    assert "fp32_on_gpu" in codes(spec(), hardware=get_profile("a100-80gb"))


def test_a_language_model_without_a_hugging_face_export_is_told_why_and_how_to_get_one() -> None:
    # The schema's defaults (softmax scores, aux-free bias) select experts by softmax + bias: no stock router does.
    default = codes(spec())["not_exportable"]
    assert default.severity == "info" and default.path == "model.moe.balancing" and "softmax + bias" in default.message
    assert default.patch == {"model.moe.scoring": "sigmoid"}
    assert "not_exportable" not in codes(spec(model={"moe": {"scoring": "sigmoid"}}))  # the patch: GLM-4-MoE
    assert "not_exportable" not in codes(spec(model={"moe": {"balancing": "aux_loss"}}))  # Qwen2-MoE
    layernorm = codes(spec(model={"norm": "layernorm", "moe": {"scoring": "sigmoid"}}))["not_exportable"]
    assert layernorm.path == "model.norm" and layernorm.patch == {}
    # A classifier has no export to gain (the families are causal LMs): nothing to say.
    assert "not_exportable" not in codes(spec(model={"task": "classification", "num_labels": 3}))
    # Every language-model template exports but the tiny demo, whose softmax router learns more per second (its
    # "why" gives the figures); its advice offers the patch.
    for name, preset in PRESETS.items():
        if preset.spec.model.task == "causal_lm":
            exports = "not_exportable" not in {a.code for a in lint(preset.spec)}
            assert exports is (name != "tiny-cpu-demo"), name
    assert "GLM-4-MoE" in PRESETS["tiny-cpu-demo"].why


def test_cross_field_mistakes_still_get_advice() -> None:
    raw = spec(model={"hidden_size": 250, "num_heads": 4})
    built = spec_ignoring_cross_field_rules(raw)
    assert built.model.hidden_size == 250
    advice = codes(raw)["heads_divide_hidden"]
    assert advice.patch == {"model.hidden_size": 256, "model.num_heads": 4}
    # A field that is itself invalid gives no advice: its validation error says more.
    assert lint_raw(spec(model={"num_layers": 0})) == []
    assert lint_raw({"model": "not an object"}) == []


def test_typical_learning_rates_fall_with_size() -> None:
    sizes = [1e6, 1e8, 1.25e8, 1e9, 1e10, 1e12]
    rates = [typical_learning_rate(int(n)) for n in sizes]
    assert rates == sorted(rates, reverse=True)
    assert typical_learning_rate(int(1.25e8)) == pytest.approx(6e-4)
    assert typical_learning_rate(int(1.3e9)) == pytest.approx(2e-4)
    assert typical_learning_rate(10) == pytest.approx(3e-3)


def test_the_registry_holds_every_rule_once_and_each_advice_code_belongs_to_one_rule() -> None:
    defined = [f for name, f in vars(lint_module).items() if name.startswith("rule_") and callable(f)]
    registered = [r.check for r in RULES]
    assert len(registered) == len(defined) and set(registered) == set(defined)  # each defined rule, once
    names = [r.name for r in RULES]
    assert len(set(names)) == len(names)
    all_codes = [code for r in RULES for code in r.codes]
    assert len(set(all_codes)) == len(all_codes)
    # A rule gives only the codes it declared (on specs that make most rules speak).
    raws = [
        spec(model={"hidden_size": 250, "num_heads": 3, "num_kv_heads": 2, "activation": "gelu"}),
        spec(model={"vocab_size": 50265, "moe": {"num_routed_experts": 6, "top_k": 6, "capacity_factor": 0.5}}),
        spec(training={"schedule": {"warmup_steps": 0, "kind": "constant"}, "grad_clip": None}),
        spec(training={"precision": "fp16", "eval_interval": 5000, "checkpoint_interval": 5000}),
        AUX_HIGH,
        spec(
            model={"attention": "mla", "mla": {"kv_lora_rank": 1024}, "mtp_depth": 3},
            training={"optimizer": {"name": "muon", "adjust_lr": "original", "weight_decay": 0}},
        ),
        spec(
            model={"moe": {"num_routed_experts": 8, "n_group": 4, "topk_group": 2}},
            training={"optimizer": {"name": "sgd"}},
        ),
        spec(model={"attention": "gqa", "num_kv_heads": 4, "mtp_depth": 1}, training={"mtp_loss_weight": 0}),
    ]
    seen: set[str] = set()
    for raw in raws:
        for hardware in (None, T4, CPU, get_profile("a100-80gb")):
            ctx = LintContext(spec_ignoring_cross_field_rules(raw), hardware, 4, 10_000)
            for r in RULES:
                given = {a.code for a in r.check(ctx)}
                assert given <= set(r.codes), r.name
                seen |= given
    assert len(seen) > len(RULES) // 2
