"""The wizard: a valid spec for every combination of answers, reasons for every choice, and its pages."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from builder.configs.forms import TWEAKS
from builder.configs.models import Config
from builder.configs.presets import PRESETS
from builder.configs.services import create_config
from builder.configs.wizard import DATA_SIZES, GPU_COUNTS, HOURS_CHOICES, Answers, estimate_proposal, propose
from builder.core.formatting import human_bytes
from tests.conftest import signed_in
from workers.engine.estimate import kv_cache_bytes_per_token, optimizer_state_elements
from workers.engine.hardware import PROFILES, cpu_profile
from workers.engine.hf_families import hf_family
from workers.engine.lint import lint
from workers.engine.spec import load_spec

# Fields the wizard decides; each must carry a reason on every proposal.
DECIDED = (
    "model.task", "model.num_layers", "model.hidden_size", "model.num_heads", "model.activation",
    "model.moe.num_routed_experts", "model.moe.top_k", "model.moe.num_shared_experts", "model.moe.expert_hidden_size",
    "model.moe.balancing", "model.vocab_size", "model.dropout", "data.seq_len", "training.batch_size",
    "training.grad_accum_steps", "training.precision", "training.gradient_checkpointing", "training.max_steps",
    "training.optimizer.lr", "training.optimizer.weight_decay", "training.schedule.warmup_steps",
    "training.schedule.kind", "training.grad_clip", "model.attention", "model.mtp_depth", "model.moe.n_group",
    "model.moe.topk_group", "model.moe.routed_scaling_factor", "training.optimizer.name", "training.compile",
)  # fmt: skip


@pytest.mark.parametrize(
    ("task", "data_size", "hardware", "priority"),
    list(itertools.product(("generation", "classification"), DATA_SIZES, PROFILES, ("speed", "quality"))),
)
def test_every_combination_of_answers_gives_a_valid_spec(
    task: str, data_size: str, hardware: str, priority: str
) -> None:
    """For each task × data × hardware × priority, every GPU count the hardware allows and every budget, with
    short and long texts and continuing later or not in turn."""
    profile = PROFILES[hardware]
    for i, (gpus, hours) in enumerate(itertools.product(GPU_COUNTS, HOURS_CHOICES)):
        if gpus > profile.max_devices:
            continue
        context, continue_later = ("long" if i % 2 else "short"), i % 3 == 0
        answers = Answers(
            task,  # type: ignore[arg-type]
            data_size,
            hardware,
            gpus,
            hours,
            priority,  # type: ignore[arg-type]
            num_labels=7,
            context=context,  # type: ignore[arg-type]
            continue_later=continue_later,
        )
        proposal = propose(answers)
        spec = load_spec(proposal.spec.model_dump(mode="json"))  # valid, and stable through JSON
        where = f"{answers}"
        assert spec.model.task == ("classification" if task == "classification" else "causal_lm"), where
        assert spec.model.num_labels == (7 if task == "classification" else None), where
        for path in DECIDED:
            assert proposal.reasons.get(path), f"{where}: no reason for {path}"
        if task == "classification":
            assert spec.training.label_smoothing == 0.1 and proposal.reasons["training.label_smoothing"], where
        # Rules of thumb the wizard promises.
        assert spec.model.hidden_size % spec.model.num_heads == 0 and spec.model.head_dim % 8 == 0, where
        assert spec.model.activation == "swiglu", where
        assert spec.training.schedule.kind == ("wsd" if continue_later else "cosine"), where
        long_generation = context == "long" and task == "generation"
        expected_attention = ("mla" if priority == "quality" else "gqa") if long_generation else "mha"
        assert spec.model.attention == expected_attention, where
        assert spec.model.mtp_depth == 0 or (task, priority) == ("generation", "quality"), where
        assert spec.model.moe.n_group == gpus and spec.model.moe.topk_group == max(1, gpus // 2), where
        assert 0 < spec.training.schedule.warmup_steps <= max(10, spec.training.max_steps // 10), where
        assert spec.model.moe.num_routed_experts % gpus == 0, where
        assert profile.supports(spec.training.precision), where
        if profile.kind == "gpu":
            assert spec.training.precision in ("bf16", "fp16"), where
        # It fits the hardware, and lint has nothing to warn about unless a note says why.
        est = estimate_proposal(proposal)
        assert est.risk.level == "fits", f"{where}: {est.risk.message}"
        warnings = [
            a.code
            for a in lint(spec, hardware=profile, num_gpus=gpus, dataset_tokens=answers.dataset_tokens)
            if a.severity == "warning"
        ]
        explained = {"overfit_risk"} if any("overfitting" in n for n in proposal.notes) else set()
        assert set(warnings) <= explained, f"{where}: {warnings}"


def test_depth_follows_the_amount_of_data_when_the_budget_allows() -> None:
    def layers(data_size: str, priority: str) -> int:
        answers = Answers("generation", data_size, "h100-80gb", 8, 168, priority)  # type: ignore[arg-type]
        return propose(answers).spec.model.num_layers

    assert 6 <= layers("small", "speed") <= 12 and 6 <= layers("small", "quality") <= 12
    assert 12 <= layers("medium", "quality") <= 24
    assert 24 <= layers("large", "speed") <= 36 and 24 <= layers("huge", "quality") <= 36
    # A small budget on a CPU cuts the model below the data's range, and says so (6 minutes: at the CPU profile's
    # measured matmul peak a quarter of an hour affords 6 layers of width 256).
    tight = propose(Answers("generation", "small", "cpu", 1, 0.1, "quality"))
    assert tight.spec.model.num_layers < 6
    assert any("6–12 layers" in n for n in tight.notes)


def test_memory_pressure_turns_on_checkpointing_with_its_reason() -> None:
    proposal = propose(Answers("generation", "huge", "h100-80gb", 8, 72, "quality"))
    assert proposal.spec.training.gradient_checkpointing
    assert "Memory is tight" in proposal.reasons["training.batch_size"]
    assert proposal.reasons["training.gradient_checkpointing"].startswith("On:")


@pytest.mark.parametrize(
    ("flags", "precision", "reason"),
    [
        ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "bf16", "multiplies bf16 natively"),
        ("avx2 avx512f avx512_bf16", "bf16", "multiplies bf16 natively"),
        ("avx2 avx512f avx512_vnni", "fp32", "no native bf16 units"),
    ],
)
def test_a_cpu_with_native_bf16_is_proposed_bf16_and_another_fp32(
    flags: str, precision: str, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU profile as read from another machine's ``/proc/cpuinfo`` flags (injected)."""
    monkeypatch.setitem(PROFILES, "cpu", cpu_profile(frozenset(flags.split())))
    proposal = propose(Answers("generation", "small", "cpu", 1, 1, "quality"))
    assert proposal.spec.training.precision == precision
    assert reason in proposal.reasons["training.precision"]
    # The estimator times it at the precision's peak only where the CPU has it, and lint finds nothing to say.
    assert estimate_proposal(proposal).time.precision_supported
    assert "precision_unsupported" not in {a.code for a in lint(proposal.spec, hardware=PROFILES["cpu"])}


def test_the_compile_reason_weighs_this_runs_steps_against_the_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an AMX CPU a quarter of an hour proposes 733 steps of about 37 s in all: at most ~11 s saved against a
    ~30 s compile. The reason said "worth turning on for runs of more than a few hundred steps" beside it, left off.
    """
    monkeypatch.setitem(
        PROFILES, "cpu", cpu_profile(frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    )
    short = propose(Answers("generation", "tiny", "cpu", 1, 0.25, "quality"))
    reason = short.reasons["training.compile"]
    assert not short.spec.training.compile and reason.startswith("Off: ")
    assert reason.endswith("less than the compile takes.") and "few hundred steps" not in reason
    long = propose(Answers("generation", "small", "cpu", 1, 12, "quality"))
    assert "min of steps it would save at most about" in long.reasons["training.compile"]
    assert long.reasons["training.compile"].endswith(
        "more than the compile takes: worth trying (the estimate counts the compile when it is on)."
    )
    # One device, not "one GPU", on a CPU.
    assert short.reasons["model.moe.n_group"].startswith("One group: on one device every expert is local")


def test_long_generation_gets_a_smaller_kv_cache_with_its_reason() -> None:
    short = propose(Answers("generation", "small", "a10", 1, 12, "quality"))
    quality = propose(Answers("generation", "small", "a10", 1, 12, "quality", context="long"))
    speed = propose(Answers("generation", "small", "a10", 1, 12, "speed", context="long"))
    classifier = propose(Answers("classification", "small", "a10", 1, 12, "quality", context="long"))
    assert short.spec.model.attention == "mha" and "not what limits generation" in short.reasons["model.attention"]
    assert classifier.spec.model.attention == "mha" and "no KV cache" in classifier.reasons["model.attention"]
    m = quality.spec.model
    assert m.attention == "mla" and m.num_kv_heads is None
    latent, mha = m.mla.kv_lora_rank + m.mla.qk_rope_head_dim, 2 * m.hidden_size
    assert latent < mha / 2 and m.mla.qk_rope_head_dim == m.head_dim // 2
    reason = quality.reasons["model.attention"]
    assert "Multi-head latent attention" in reason and f"{mha / latent:.1f}× smaller" in reason, reason
    assert quality.reasons["model.mla.kv_lora_rank"] and quality.reasons["model.mla.qk_rope_head_dim"]
    # Long generation trains on longer sequences on a GPU.
    assert quality.spec.data.seq_len == 2 * short.spec.data.seq_len
    g = speed.spec.model
    assert g.attention == "gqa" and g.num_heads % g.kv_heads == 0 and g.kv_heads <= g.num_heads // 4
    assert "Grouped-query attention" in speed.reasons["model.attention"] and speed.reasons["model.num_kv_heads"]


def test_multi_token_prediction_when_the_budget_affords_the_data_not_when_it_is_the_limit() -> None:
    ample = propose(Answers("generation", "small", "a10", 1, 168, "quality"))
    assert ample.spec.model.mtp_depth == 1 and ample.spec.training.mtp_loss_weight == 0.3
    assert "One multi-token prediction module" in ample.reasons["model.mtp_depth"]
    assert "DeepSeek-V3" in ample.reasons["training.mtp_loss_weight"]
    tight = propose(Answers("generation", "medium", "cpu", 1, 0.25, "quality"))
    assert tight.spec.model.mtp_depth == 0
    assert "the budget is the limit" in tight.reasons["model.mtp_depth"], tight.reasons["model.mtp_depth"]
    speed = propose(Answers("generation", "small", "a10", 1, 168, "speed"))
    assert speed.spec.model.mtp_depth == 0 and "you asked for speed" in speed.reasons["model.mtp_depth"]


def test_group_limited_routing_follows_the_gpus() -> None:
    one = propose(Answers("generation", "medium", "h100-80gb", 1, 24, "quality"))
    assert (one.spec.model.moe.n_group, one.spec.model.moe.topk_group) == (1, 1)
    assert "every expert is local" in one.reasons["model.moe.n_group"]
    four = propose(Answers("generation", "medium", "h100-80gb", 4, 24, "quality"))
    moe = four.spec.model.moe
    assert (moe.n_group, moe.topk_group) == (4, 2)
    assert "one per GPU" in four.reasons["model.moe.n_group"]
    assert "at most 2 of 4 GPUs" in four.reasons["model.moe.topk_group"]
    assert moe.routed_scaling_factor == 1.0 and "sum to 1" in four.reasons["model.moe.routed_scaling_factor"]
    # DeepSeek-V3's router (sigmoid scores, the aux-free bias): the proposal exports to transformers.
    assert (moe.scoring, moe.balancing) == ("sigmoid", "aux_free") and "transformers" in four.reasons[
        "model.moe.scoring"
    ]
    assert hf_family(four.spec.model) == "glm4_moe" and hf_family(one.spec.model) in ("glm4_moe", "deepseek_v3")


def test_the_optimizer_and_schedule_follow_memory_cost_and_whether_the_run_continues() -> None:
    tight = propose(Answers("generation", "huge", "h100-80gb", 8, 72, "quality"))
    assert tight.spec.training.gradient_checkpointing and tight.spec.training.optimizer.name == "adafactor"
    assert "memory is tight" in tight.reasons["training.optimizer.name"]
    cpu = propose(Answers("generation", "tiny", "cpu", 1, 0.25, "quality"))
    assert cpu.spec.training.optimizer.name == "adamw" and "On a CPU" in cpu.reasons["training.optimizer.name"]
    speed = propose(Answers("generation", "small", "a10", 1, 12, "speed"))
    assert speed.spec.training.optimizer.name == "adamw"
    assert "you asked for speed" in speed.reasons["training.optimizer.name"]
    for answers in (
        Answers("generation", "small", "a10", 1, 12, "quality"),
        *(Answers("generation", "medium", "h100-80gb", gpus, 24, "quality") for gpus in (1, 4)),
    ):
        proposal = propose(answers)
        o, reason = proposal.spec.training.optimizer, proposal.reasons["training.optimizer.name"]
        # Muon exactly when its estimated extra step time is within the wizard's threshold, said either way.
        extra = int(reason.split("longer")[0].rsplit("+", 1)[1].strip().rstrip("%"))
        assert (o.name == "muon") == (extra <= 10), reason
        if o.name == "muon":
            assert o.adamw_lr == o.lr and "AdamW's rate carries over" in proposal.reasons["training.optimizer.lr"]
    again = propose(Answers("generation", "small", "a10", 1, 12, "quality", continue_later=True))
    assert again.spec.training.schedule.kind == "wsd" and again.spec.training.schedule.decay_fraction == 0.2
    assert "You may continue training" in again.reasons["training.schedule.kind"]
    assert "warmup-stable-decay is proposed" in speed.reasons["training.schedule.kind"]


def test_answers_are_checked() -> None:
    with pytest.raises(ValueError, match="num_gpus"):
        Answers("generation", "tiny", "cpu", PROFILES["cpu"].max_devices + 1, 1, "speed")
    with pytest.raises(ValueError, match="data_size"):
        Answers("generation", "enormous", "cpu", 1, 1, "speed")
    with pytest.raises(ValueError, match="context"):
        Answers("generation", "tiny", "cpu", 1, 1, "speed", context="medium")  # type: ignore[arg-type]


# -- pages ---------------------------------------------------------------------------------------------------

ANSWERS = {
    "task": "generation",
    "num_labels": "2",
    "data_size": "tiny",
    "hardware": "cpu",
    "num_gpus": "1",
    "hours": "0.25",
    "priority": "quality",
}


@pytest.mark.django_db
def test_wizard_steps_propose_tweak_and_save(alice: Any) -> None:
    client = signed_in(alice)
    assert b'data-testid="wizard-step-1"' in client.get("/configure/wizard/").content
    # A step without its answer stays on that step, naming the field.
    response = client.post("/configure/wizard/", {"step": "1"})
    assert response.status_code == 400 and b'data-testid="error-task"' in response.content
    # Classification needs the number of classes.
    response = client.post("/configure/wizard/", {"step": "1", "task": "classification", "num_labels": ""})
    assert response.status_code == 400 and b"num_labels: give the number of classes" in response.content
    data: dict[str, str] = {}
    for step, fields in enumerate((("task", "num_labels"), ("data_size",), ("hardware", "num_gpus", "hours"))):
        data.update({k: ANSWERS[k] for k in fields})
        response = client.post("/configure/wizard/", {**data, "step": str(step + 1)}, HTTP_HX_REQUEST="true")
        assert response.status_code == 200, response.content[:500]
        assert f'data-testid="wizard-step-{step + 2}"'.encode() in response.content
    data["priority"] = ANSWERS["priority"]
    response = client.post("/configure/wizard/", {**data, "step": "4"})
    html = response.content.decode()
    assert 'data-testid="proposal"' in html and 'data-testid="estimate"' in html
    assert html.count('data-testid="reason"') == len(TWEAKS)
    # The optimizer, schedule, routing and prediction choices are shown with their reasons, not folded away.
    for path in ("training.optimizer.name", "model.moe.n_group", "model.moe.routed_scaling_factor"):
        assert f'<li data-path="{path}">' in html, path
    assert "Multi-head attention" in html and "latent attention (MLA)" in html
    # Long texts: latent attention, with its cache against multi-head attention's.
    long = client.post("/configure/wizard/", {**data, "context": "long", "continue_later": "on", "step": "4"})
    assert "Multi-head latent attention" in long.content.decode() and "× smaller" in long.content.decode()
    assert '<li data-path="training.schedule.kind">' in long.content.decode()
    assert "Warmup-stable-decay" in long.content.decode()
    # Going back keeps the answers.
    back = client.post("/configure/wizard/", {**data, "step": "5", "back": "1"}).content.decode()
    assert 'data-testid="wizard-step-4"' in back and 'value="tiny"' in back

    # Tweaks: a bad value is named with its path; a good one updates the estimate.
    tweaks = {"tweaks": "1", "tweak:model.num_heads": "3", "tweak:model.num_layers": "2"}
    bad = client.post("/configure/wizard/estimate/", {**data, **tweaks}).content.decode()
    assert "model.num_heads" in bad and "must divide hidden_size" in bad and 'data-testid="proposal-invalid"' in bad
    unreadable = {**data, **tweaks, "tweak:model.num_heads": "4", "tweak:training.batch_size": "x"}
    good = client.post("/configure/wizard/estimate/", unreadable).content.decode()
    assert "training.batch_size: a whole number" in good
    ok = client.post("/configure/wizard/estimate/", {**data, **tweaks, "tweak:model.num_heads": "8"}).content.decode()
    assert 'data-testid="estimate"' in ok

    # Save: the tweaked spec becomes version 1 of a new config.
    saved = client.post(
        "/configure/wizard/save/",
        {**data, **tweaks, "tweak:model.num_heads": "8", "name": "from the wizard", "description": "d"},
    )
    assert saved.status_code == 302
    config = Config.objects.get(owner=alice, name="from the wizard")
    version = config.latest
    assert version.source == "wizard" and version.spec["model"]["num_heads"] == 8
    assert load_spec(version.spec).model.num_layers == 2
    assert saved["Location"] == f"/configure/{config.pk}/"
    # The same name again is refused on the name field.
    again = client.post("/configure/wizard/save/", {**data, "name": "from the wizard"})
    assert again.status_code == 400 and b'data-testid="error-name"' in again.content


@pytest.mark.django_db
def test_config_pages_diff_compare_and_the_outsider(alice: Any, charlie: Any) -> None:
    client = signed_in(alice)
    client.post("/configure/wizard/save/", {**ANSWERS, "name": "mine"})
    config = Config.objects.get(owner=alice, name="mine")
    spec = dict(config.latest.spec)
    from builder.configs.services import parse_spec, save_version

    changed = json.loads(json.dumps(spec))
    changed["training"]["max_steps"] += 10
    save_version(config, parse_spec(changed), source="editor", note="longer")
    page = client.get(f"/configure/{config.pk}/?a=1&b=2&hw=t4").content.decode()
    assert 'data-testid="diff"' in page and "training.max_steps" in page and "NVIDIA T4" in page
    assert client.get(f"/configure/{config.pk}/?a=1&b=7").status_code == 400
    sharded = client.get(f"/configure/{config.pk}/?hw=a100-80gb&gpus=4&par=expert").content.decode()
    assert "Worst case under expert imbalance" in sharded
    assert client.get(f"/configure/{config.pk}/?hw=cpu&gpus=4").status_code == 400  # one CPU
    assert client.get(f"/configure/{config.pk}/edit/").status_code == 200
    editor = client.get("/configure/editor/?template=moe-1b").content.decode()
    assert 'id="editor-boot"' in editor and "50265" in editor
    assert client.get("/configure/editor/?template=nope").status_code == 404

    compare = client.get(f"/configure/compare/?c=config:{config.pk}&c=template:small-moe&hw=cpu")
    html = compare.content.decode()
    assert compare.status_code == 200
    assert html.count('data-testid="memory-bar"') == 2 and 'class="differs"' in html
    inline = json.dumps({**spec, "training": {**spec["training"], "batch_size": 1}})
    edited = client.post(
        "/configure/compare/",
        {"c": [f"config:{config.pk}", "template:tiny-cpu-demo"], "hw": "cpu", "gpus": "1", "inline_0": inline},
    ).content.decode()
    assert "(edited)" in edited
    broken = client.post(
        "/configure/compare/", {"c": [f"config:{config.pk}", "template:tiny-cpu-demo"], "inline_1": "{"}
    )
    assert broken.status_code == 400 and b"inline_1" in broken.content
    assert client.get("/configure/compare/?c=template:small-moe").status_code == 400  # one is not a comparison

    panel = client.post("/configure/estimate/", {"spec": json.dumps(spec), "hw": "a10", "gpus": "1"})
    assert panel.status_code == 200 and b'data-testid="memory-bar"' in panel.content
    bad_panel = client.post("/configure/estimate/", {"spec": '{"model": {"num_layers": 0}}', "hw": "a10"})
    assert bad_panel.status_code == 400 and b"model.num_layers" in bad_panel.content

    outsider = signed_in(charlie)
    for url in (f"/configure/{config.pk}/", f"/configure/{config.pk}/edit/"):
        assert outsider.get(url).status_code == 404
    assert outsider.get(f"/configure/compare/?c=config:{config.pk}&c=template:small-moe").status_code == 404
    assert outsider.post(f"/configure/{config.pk}/delete/").status_code == 404
    assert b"mine" not in outsider.get("/configure/").content
    assert Config.objects.filter(pk=config.pk).exists()
    assert client.post(f"/configure/{config.pk}/delete/").status_code == 302
    assert not Config.objects.filter(pk=config.pk).exists()


def _row(html: str, testid: str) -> str:
    start = html.index(f'data-testid="{testid}"')
    return html[html.rindex("<tr", 0, start) : html.index("</tr>", start)]


@pytest.mark.django_db
def test_the_comparison_shows_kv_cache_mtp_cost_and_optimizer_state_and_marks_differences(
    alice: Any, charlie: Any
) -> None:
    demo = PRESETS["tiny-cpu-demo"].spec
    raw = demo.model_dump(mode="json")
    raw["model"].update(attention="mla", mtp_depth=1)
    raw["model"]["mla"].update(kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
    raw["training"]["optimizer"] = {"name": "muon", "lr": 0.002, "adamw_lr": 0.002}
    deepseek = load_spec(raw)
    config = create_config(alice, "deepseek-style demo", "", deepseek, source="editor")
    client = signed_in(alice)
    url = f"/configure/compare/?c=config:{config.pk}&c=template:tiny-cpu-demo&hw=cpu"
    html = client.get(url).content.decode()
    kv = _row(html, "arch-kv-cache")
    assert 'class="differs"' in kv
    mla_kv, mha_kv = kv_cache_bytes_per_token(deepseek), kv_cache_bytes_per_token(demo)
    assert mla_kv == 2 * (64 + 16) * 4 and mha_kv == 2 * 2 * 128 * 4
    assert human_bytes(mla_kv) in kv and human_bytes(mha_kv) in kv
    assert f"{mha_kv / mla_kv:.1f}× smaller" in kv
    mtp = _row(html, "arch-mtp")
    assert 'class="differs"' in mtp and "1 module</strong>, weight 0.3" in mtp and "% step time" in mtp
    assert mtp.count("none") == 1  # the template has no MTP module
    optimizer = _row(html, "arch-optimizer")
    assert 'class="differs"' in optimizer and "<td>muon</td>" in optimizer and "<td>adamw</td>" in optimizer
    state = _row(html, "arch-optimizer-state")
    for spec in (deepseek, demo):
        assert human_bytes(optimizer_state_elements(spec) * 4) in state
    assert 'class="differs"' in _row(html, "arch-attention") and "latent (MLA)" in html
    # Two columns that differ only in the optimizer: the attention rows are not marked.
    raw["model"].update(attention="mha", mtp_depth=0)
    other = create_config(alice, "muon only", "", load_spec(raw), source="editor")
    html = client.get(f"/configure/compare/?c=config:{other.pk}&c=template:tiny-cpu-demo&hw=cpu").content.decode()
    assert 'class="same"' in _row(html, "arch-kv-cache") and 'class="same"' in _row(html, "arch-mtp")
    assert 'class="differs"' in _row(html, "arch-optimizer")
    # The outsider cannot compare alice's configuration.
    assert signed_in(charlie).get(url).status_code in (400, 404)


def test_a_multi_gpu_proposal_asks_for_its_devices_and_predicts_what_they_run() -> None:
    # 8 GPUs: the job runs torch.distributed on 8 devices, batch_size is the global micro-batch split over them, and
    # the estimate (the same one submission checks) is of that layout, not of one device.
    proposal = propose(Answers("generation", "medium", "h100-80gb", 8, 24, "quality"))
    spec = proposal.spec
    assert spec.training.distributed.devices == 8 and spec.training.batch_size % 8 == 0
    est = estimate_proposal(proposal)
    assert est.num_gpus == 8
    target = DATA_SIZES["medium"].tokens_per_step
    assert target / 2 <= spec.tokens_per_step <= 2 * target  # global tokens per step, not 8 times them
    assert f"({spec.training.batch_size // 8} per GPU)" in proposal.reasons["training.batch_size"]


@pytest.mark.django_db
def test_the_comparison_estimates_each_config_on_the_devices_it_asks_for(alice: Any) -> None:
    two = PRESETS["tiny-cpu-demo"].spec.model_dump(mode="json")
    two["training"]["distributed"] = {"devices": 2}
    two["training"]["batch_size"] = 8
    create_config(alice, "two devices", "", load_spec(two), source="api")
    config = Config.objects.get(owner=alice, name="two devices")
    client = signed_in(alice)
    page = client.get(f"/configure/compare/?c=config:{config.pk}&c=template:tiny-cpu-demo&hw=t4")
    assert page.status_code == 200
    columns = page.context["columns"]
    assert [c["est"]["num_gpus"] for c in columns] == [2, 1]  # each as configured, none forced to the selector
    # A count given explicitly is a what-if for every column; more devices than the hardware has is said, not a 500.
    forced = client.get(f"/configure/compare/?c=config:{config.pk}&c=template:tiny-cpu-demo&hw=t4&gpus=4")
    assert [c["est"]["num_gpus"] for c in forced.context["columns"]] == [4, 4]
    two["training"]["distributed"] = {"devices": 16}
    two["training"]["batch_size"] = 16
    create_config(alice, "sixteen", "", load_spec(two), source="api")
    big = Config.objects.get(owner=alice, name="sixteen")
    page = client.get(f"/configure/compare/?c=config:{big.pk}&c=template:tiny-cpu-demo&hw=t4")
    assert page.status_code == 200 and "asks for 16 devices" in page.content.decode()
    assert page.context["columns"][0]["est"]["num_gpus"] == 8
