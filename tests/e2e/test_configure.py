"""Configure in Chromium through the real ASGI server: the wizard end to end, the JSON editor marking a bad
value and saving a good one, and the comparison with its differences and memory bars (screenshots saved)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from builder.configs.models import Config
from builder.configs.presets import PRESETS
from builder.configs.services import create_config
from tests.conftest import sign_in
from tests.services import Stack
from workers.engine.spec import load_spec

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_wizard_end_to_end(stack: Stack, page: Any, alice: Any, artifacts: Path) -> None:
    sign_in(page, stack.base_url, alice)
    page.click("nav.nav >> text=Configure")
    page.click("[data-testid=start-wizard]")
    # The number of classes is asked for classification only.
    assert not page.is_visible("input[name=num_labels]")
    page.check("input[name=task][value=classification]")
    assert page.is_visible("input[name=num_labels]")
    page.check("input[name=task][value=generation]")
    assert not page.is_visible("input[name=num_labels]")
    page.click("[data-testid=next]")
    page.wait_for_selector("[data-testid=wizard-step-2]")
    page.check("input[name=data_size][value=tiny]")
    page.click("[data-testid=next]")
    page.wait_for_selector("[data-testid=wizard-step-3]")
    page.select_option("select[name=hardware]", "cpu")
    page.select_option("select[name=hours]", "0.25")
    page.click("[data-testid=next]")
    page.wait_for_selector("[data-testid=wizard-step-4]")
    page.check("input[name=priority][value=quality]")
    # Long generation and a run that may be continued: latent attention and warmup-stable-decay, with reasons.
    page.check("input[name=context][value=long]")
    page.check("input[name=continue_later]")
    page.screenshot(path=str(artifacts / "configure-wizard-step-4.png"), full_page=True)
    page.click("[data-testid=next]")
    page.wait_for_selector("[data-testid=proposal]")
    reasons = page.locator("[data-testid=reason]").all_inner_texts()
    assert all(reasons) and any("layers" in r for r in reasons)
    assert "Multi-head latent attention" in page.locator("[data-path='model.attention'] .reason").inner_text()
    highlighted = page.locator("[data-testid=highlighted-reasons]").inner_text()
    assert "Warmup-stable-decay" in highlighted and "model.moe.routed_scaling_factor" in highlighted
    assert page.locator("[data-testid=oom-risk]").first.inner_text().lower() == "fits"
    page.screenshot(path=str(artifacts / "configure-wizard-proposal.png"), full_page=True)

    # Precision and compile are tweaks with their reasons (bf16 where this CPU multiplies it natively). The compile
    # reason weighs this run's seconds of steps against the compile (it had said "worth turning on for runs of more
    # than a few hundred steps" beside a 733-step proposal that left it off, folded away under "Other choices").
    precision_reason = page.locator("[data-path='training.precision'] .reason").inner_text()
    assert precision_reason.startswith(("bf16: this CPU multiplies bf16 natively", "fp32: this CPU has no native bf16"))
    compile_tweak = page.locator("[data-path='training.compile']")
    compile_reason = compile_tweak.locator(".reason").inner_text()
    assert compile_reason.startswith("Off: torch.compile first compiles") and "compile takes" in compile_reason
    # Ticked, the estimate's training time counts the compile, and says so.
    total = page.locator("[data-testid=total-time]").inner_text()
    assert "to compile" not in page.locator("[data-testid=total-time-note]").inner_text()
    compile_tweak.locator("input[type=checkbox]").check()
    page.wait_for_function(
        "b => document.querySelector('[data-testid=total-time]').textContent !== b", arg=total, timeout=15000
    )
    assert "s to compile" in page.locator("[data-testid=total-time-note]").inner_text()
    compile_tweak.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "configure-wizard-compile.png"), full_page=False)
    compile_tweak.locator("input[type=checkbox]").uncheck()
    page.wait_for_function(
        "b => document.querySelector('[data-testid=total-time]').textContent === b", arg=total, timeout=15000
    )

    # Tweak: one more layer; the estimate follows (htmx swaps the panel).
    before = page.locator("[data-testid=params-total]").inner_text()
    layers = page.locator("[data-path='model.num_layers'] input")
    layers.fill(str(int(layers.input_value()) + 2))
    layers.dispatch_event("change")
    page.wait_for_function(
        "b => document.querySelector('[data-testid=params-total]').textContent !== b", arg=before, timeout=15000
    )
    # A bad tweak is named at its field; fixing it brings the estimate back.
    heads = page.locator("[data-path='model.num_heads'] input")
    proposed_heads = heads.input_value()
    heads.fill("3")
    heads.dispatch_event("change")
    page.wait_for_selector("[data-testid=proposal-invalid]")
    error = page.locator("[data-path='model.num_heads'] .error")
    assert error.is_visible() and error.inner_text().startswith("model.num_heads: num_heads (3) must divide")
    page.screenshot(path=str(artifacts / "configure-wizard-bad-tweak.png"), full_page=False)
    heads.fill(proposed_heads)
    heads.dispatch_event("change")
    page.wait_for_selector("#proposal-estimate [data-testid=estimate]")

    page.fill("#id_name", "wizard e2e")
    page.click("[data-testid=save-proposal]")
    page.wait_for_selector("[data-testid=config-name]")
    assert page.locator("[data-testid=config-name]").inner_text() == "wizard e2e"
    page.screenshot(path=str(artifacts / "configure-saved.png"), full_page=True)
    config = Config.objects.get(owner=alice, name="wizard e2e")
    assert config.latest.source == "wizard"


def _set_doc(page: Any, text: str) -> None:
    page.evaluate(
        "t => window.specEditor.dispatch({changes: {from: 0, to: window.specEditor.state.doc.length, insert: t}})",
        text,
    )


def test_json_editor_marks_a_bad_value_and_saves_a_good_one(
    stack: Stack, page: Any, alice: Any, artifacts: Path, tmp_path: Path
) -> None:
    sign_in(page, stack.base_url, alice)
    page.goto(f"{stack.base_url}/configure/editor/?template=tiny-cpu-demo")
    page.wait_for_selector("[data-testid=editor-status][data-valid=true]", timeout=20000)
    page.wait_for_selector("#editor-estimate [data-testid=estimate]", timeout=20000)

    spec = PRESETS["tiny-cpu-demo"].as_dict()["spec"]
    # A value outside the schema's bounds: marked at its line, listed with its field.
    bad = json.loads(json.dumps(spec))
    bad["model"]["num_layers"] = 0
    text = json.dumps(bad, indent=2)
    _set_doc(page, text)
    page.wait_for_selector("[data-testid=editor-status][data-valid=false]")
    problem = page.locator("[data-testid=editor-problems] li").first
    expected_line = next(i for i, line in enumerate(text.splitlines(), 1) if '"num_layers"' in line)
    assert problem.get_attribute("data-line") == str(expected_line)
    assert "num_layers" in problem.inner_text()
    assert page.locator(".cm-lint-marker-error").count() >= 1
    page.screenshot(path=str(artifacts / "configure-editor-bad-value.png"), full_page=True)

    # A cross-field mistake the JSON Schema cannot see: the server's rule, at the line of top_k.
    cross = json.loads(json.dumps(spec))
    cross["model"]["moe"]["top_k"] = spec["model"]["moe"]["num_routed_experts"] + 2  # more than the routed experts
    text = json.dumps(cross, indent=2)
    _set_doc(page, text)
    page.wait_for_selector("[data-testid=editor-problems] li:has-text('model.moe.top_k')", timeout=15000)
    top_k_line = next(i for i, line in enumerate(text.splitlines(), 1) if '"top_k"' in line)
    assert page.locator("[data-testid=editor-problems] li").first.get_attribute("data-line") == str(top_k_line)
    # The advice says what to change.
    assert "top_k" in page.locator("[data-testid=editor-advice]").inner_text()

    # Completion of keys and enum values, description on hover.
    _set_doc(page, json.dumps({"training": {"precision": ""}}, indent=2))
    page.locator(".cm-content").click()
    page.evaluate(
        "() => { const v = window.specEditor; const at = v.state.doc.toString().indexOf('\"\"') + 1;"
        " v.dispatch({selection: {anchor: at}}); v.focus(); }"
    )
    page.keyboard.press("Control+Space")
    page.wait_for_selector(".cm-tooltip-autocomplete li", timeout=10000)
    options = page.locator(".cm-tooltip-autocomplete li").all_inner_texts()
    assert any("bf16" in o for o in options), options
    page.keyboard.press("Escape")
    at = page.evaluate(
        "() => { const v = window.specEditor; const c = v.coordsAtPos(v.state.doc.toString().indexOf('precision') + 3);"
        " return {x: c.left, y: (c.top + c.bottom) / 2}; }"
    )
    for dx in (0, 3, 6):  # a few real mouse moves: CodeMirror's hover waits for the pointer to rest
        page.mouse.move(at["x"] + dx, at["y"])
        page.wait_for_timeout(150)
    page.wait_for_selector(".cm-tooltip-hover", timeout=10000)
    page.screenshot(path=str(artifacts / "configure-editor-hover.png"))
    assert "Autocast precision" in page.locator(".cm-tooltip-hover").inner_text()

    # Upload a file, format it, download it back.
    good = json.loads(json.dumps(spec))
    good["training"]["max_steps"] = 123
    upload = tmp_path / "good.json"
    upload.write_text(json.dumps(good))  # one line: Format spreads it out
    page.set_input_files("[data-testid=editor-upload]", str(upload))
    page.click("[data-testid=editor-format]")
    assert page.evaluate("() => window.specEditor.state.doc.lines") > 20
    page.wait_for_selector("[data-testid=editor-status][data-valid=true]", timeout=15000)
    with page.expect_download() as download:
        page.click("[data-testid=editor-download]")
    assert json.loads(Path(download.value.path()).read_text()) == good

    page.fill("[data-testid=editor-name]", "edited in json")
    page.screenshot(path=str(artifacts / "configure-editor-valid.png"), full_page=True)
    page.click("[data-testid=editor-save]")
    page.wait_for_selector("[data-testid=config-name]")
    config = Config.objects.get(owner=alice, name="edited in json")
    assert config.latest.spec["training"]["max_steps"] == 123 and config.latest.source == "editor"

    # A new version through the editor; the server's own check refuses a bad one and names the field.
    page.click("[data-testid=edit-json]")
    page.wait_for_selector("[data-testid=editor-status][data-valid=true]", timeout=20000)
    page.evaluate("() => document.querySelector('[data-testid=editor-save]').click()")
    page.wait_for_selector("[data-testid=config-name]")
    assert config.versions.count() == 2


def _complete_at(page: Any, text: str, marker: str, screenshot: Path | None = None) -> list[str]:
    """Put ``text`` in the editor, the cursor inside ``marker`` (its middle), and ask for completion."""
    _set_doc(page, text)
    page.locator(".cm-content").click()
    page.evaluate(
        "([m]) => { const v = window.specEditor; const at = v.state.doc.toString().indexOf(m) + m.length / 2;"
        " v.dispatch({selection: {anchor: at}}); v.focus(); }",
        [marker],
    )
    page.keyboard.press("Control+Space")
    page.wait_for_selector(".cm-tooltip-autocomplete li", timeout=10000)
    options = page.locator(".cm-tooltip-autocomplete li .cm-completionLabel").all_inner_texts()
    if screenshot is not None:
        page.screenshot(path=str(screenshot))
    page.keyboard.press("Escape")
    return options


def test_json_editor_completes_and_checks_the_chosen_optimizer_and_latent_attention(
    stack: Stack, page: Any, alice: Any, artifacts: Path
) -> None:
    """The optimizer is a oneOf chosen by ``name`` (the schema's discriminator): naming muon offers Muon's own
    fields and not AdamW's, a Muon field out of bounds is marked at its line, an AdamW field under muon is
    refused; MLA's fields complete under ``model.mla``."""
    sign_in(page, stack.base_url, alice)
    page.goto(f"{stack.base_url}/configure/editor/?template=tiny-cpu-demo")
    page.wait_for_selector("[data-testid=editor-status][data-valid=true]", timeout=20000)

    def keys(options: list[str]) -> set[str]:
        return {o.strip().strip('"') for o in options}

    shot = artifacts / "configure-editor-muon-completion.png"
    muon = keys(_complete_at(page, '{"training": {"optimizer": {"name": "muon", "": 1}}}', '""', shot))
    assert {"ns_steps", "adamw_lr", "adjust_lr", "momentum"} <= muon, muon
    assert "betas" not in muon and "beta2_decay" not in muon, muon
    adamw = keys(_complete_at(page, '{"training": {"optimizer": {"name": "adamw", "": 1}}}', '""'))
    assert {"betas", "eps"} <= adamw and "ns_steps" not in adamw, adamw
    adafactor = keys(_complete_at(page, '{"training": {"optimizer": {"name": "adafactor", "": 1}}}', '""'))
    assert {"beta2_decay", "clip_threshold"} <= adafactor and "betas" not in adafactor, adafactor
    names = _complete_at(page, '{"training": {"optimizer": {"name": ""}}}', '""')
    assert {"adamw", "adafactor", "sgd", "muon"} <= keys(names), names
    mla = keys(_complete_at(page, '{"model": {"attention": "mla", "mla": {"": 1}}}', '""'))
    assert {"kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"} <= mla, mla

    # Validation by the chosen optimizer: Muon's bound at its line; AdamW's betas are not Muon's.
    spec = PRESETS["tiny-cpu-demo"].as_dict()["spec"]
    spec["training"]["optimizer"] = {"name": "muon", "lr": 0.002, "ns_steps": 0}
    text = json.dumps(spec, indent=2)
    _set_doc(page, text)
    page.wait_for_selector("[data-testid=editor-status][data-valid=false]")
    line = next(i for i, row in enumerate(text.splitlines(), 1) if '"ns_steps"' in row)
    problems = page.locator("[data-testid=editor-problems] li")
    assert problems.first.get_attribute("data-line") == str(line), problems.all_inner_texts()
    assert "ns_steps" in problems.first.inner_text()
    spec["training"]["optimizer"] = {"name": "muon", "betas": [0.9, 0.95]}
    text = json.dumps(spec, indent=2)
    _set_doc(page, text)
    page.wait_for_selector("[data-testid=editor-status][data-valid=false]")
    # (an unknown key is marked at the object that may not hold it)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if '"optimizer"' in row)
    assert problems.first.get_attribute("data-line") == str(line), problems.all_inner_texts()
    assert "betas" in problems.first.inner_text()
    # Valid Muon and MLA settings (and an optimizer without a name, which is AdamW): no problem.
    spec["training"]["optimizer"] = {"name": "muon", "lr": 0.002, "ns_steps": 3, "adamw_lr": 0.002}
    spec["model"]["attention"] = "mla"
    spec["model"]["mla"] = {"kv_lora_rank": 64, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32}
    _set_doc(page, json.dumps(spec, indent=2))
    page.wait_for_selector("[data-testid=editor-status][data-valid=true]", timeout=15000)
    spec["training"]["optimizer"] = {"lr": 0.002}
    _set_doc(page, json.dumps(spec, indent=2))
    page.wait_for_selector("[data-testid=editor-status][data-valid=true]", timeout=15000)


def test_comparison_shows_differences_and_memory_bars(stack: Stack, page: Any, alice: Any, artifacts: Path) -> None:
    config = create_config(alice, "my small MoE", "", PRESETS["tiny-cpu-demo"].spec, source="template")
    sign_in(page, stack.base_url, alice)
    page.goto(
        f"{stack.base_url}/configure/compare/?c=config:{config.pk}&c=template:small-moe&c=template:moe-1b&hw=a100-80gb"
    )
    titles = page.locator("[data-testid=column-title]").all_text_contents()
    assert titles == ["my small MoE v1", "Template: Small MoE generator", "Template: 1B-class MoE"]
    bars = page.locator("[data-testid=compare-table] [data-testid=memory-bar]")
    assert bars.count() == 3
    # Bars share one scale: the 1B model's weights segment is the widest.
    widths = [bars.nth(i).locator(".seg.weights").evaluate("e => e.getBoundingClientRect().width") for i in range(3)]
    assert widths[2] > widths[1] > widths[0] >= 0
    differing = page.locator("[data-testid=fields-table] tr.differs")
    assert differing.count() > 10
    assert page.locator("[data-testid=fields-table] tr.differs[data-path='model.num_layers']").count() == 1
    assert page.locator("[data-testid=fields-table] tr.same").count() > 0
    risks = page.locator("[data-testid=compare-table] [data-testid=oom-risk]").all_inner_texts()
    assert len(risks) == 3
    launch = page.locator("[data-testid=compare-table] [data-testid=launch]")
    assert launch.count() == 3
    # The saved configuration launches through the jobs app's form; templates must be saved first.
    # The saved one has the jobs app's one-click form for its latest version (and a link to the full form).
    form = page.locator("[data-testid=compare-table] form.job-quick-launch")
    assert form.count() == 1
    assert form.locator("input[name=config_version]").get_attribute("value") == str(config.latest.pk)
    assert form.locator("a").get_attribute("href") == f"/jobs/new/?config_version={config.latest.pk}"
    assert launch.nth(1).is_disabled() and "Save it" in (launch.nth(1).get_attribute("title") or "")
    page.screenshot(path=str(artifacts / "configure-compare.png"), full_page=True)
    # Only the differences.
    page.check("#only-diff")
    assert page.locator("[data-testid=fields-table] tr.same").first.is_hidden()

    # Edit a column inline and compare again: the change shows up as that column's.
    page.locator("details:has([data-testid=inline-0]) summary").click()
    inline = page.locator("[data-testid=inline-0]")
    edited = json.loads(inline.input_value())
    edited["model"]["num_layers"] = 3
    inline.fill(json.dumps(edited, indent=2))
    page.click("[data-testid=compare-submit]")
    page.wait_for_selector("[data-testid=column-title]:has-text('(edited)')")
    row = page.locator("[data-testid=fields-table] tr[data-path='model.num_layers'] td")
    assert row.nth(1).inner_text() == "3"
    # Latent attention, MTP and Muon against the template: the KV cache, MTP's cost and the optimizer state.
    raw = PRESETS["tiny-cpu-demo"].spec.model_dump(mode="json")
    raw["model"].update(attention="mla", mtp_depth=1)
    raw["model"]["mla"].update(kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
    raw["training"]["optimizer"] = {"name": "muon", "lr": 0.002, "adamw_lr": 0.002}
    deepseek = create_config(alice, "deepseek-style", "", load_spec(raw), source="editor")
    page.goto(f"{stack.base_url}/configure/compare/?c=config:{deepseek.pk}&c=template:tiny-cpu-demo&hw=cpu")
    for testid in ("arch-attention", "arch-kv-cache", "arch-mtp", "arch-optimizer", "arch-optimizer-state"):
        assert page.locator(f"[data-testid={testid}]").get_attribute("class") == "differs", testid
    assert "× smaller" in page.locator("[data-testid=arch-kv-cache]").inner_text()
    page.locator("[data-testid=arch-attention]").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "configure-compare-deepseek.png"), full_page=True)
