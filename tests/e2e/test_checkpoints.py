"""The browser imports a Hugging Face folder (as the zip a report offers), reads its family and derived spec, saves
it as a configuration and reaches the launch form with "Start from" set to it."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import sign_in
from tests.services import Stack
from workers.engine.data import build_byte_tokenizer
from workers.engine.hf import write_hf_folder
from workers.engine.model import build_model
from workers.engine.spec import Spec

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

MODEL = {
    "vocab_size": 260, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "max_seq_len": 32, "attention": "mla",
    "mla": {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8},
    "moe": {"num_routed_experts": 4, "top_k": 2, "expert_hidden_size": 32, "scoring": "sigmoid"},
}  # fmt: skip


def test_a_checkpoint_imports_in_the_browser_and_launches(
    stack: Stack, page: Any, alice: Any, artifacts: Path, tmp_path: Path
) -> None:
    build_byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    spec = Spec.model_validate({"model": MODEL, "data": {"seq_len": 32}})
    torch.manual_seed(0)
    export = write_hf_folder(
        spec.model, build_model(spec).state_dict(), tmp_path / "f", tokenizer=tmp_path / "tokenizer.json"
    )
    archive = tmp_path / "huggingface.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for name, path in export.files.items():
            out.write(path, f"job-1-step-20/{name}")

    sign_in(page, stack.base_url, alice)
    page.click("nav.nav >> text=Checkpoints")
    page.wait_for_url(f"{stack.base_url}/checkpoints/")
    page.screenshot(path=str(artifacts / "checkpoint-list.png"), full_page=True)
    page.fill("#checkpoint-name", "tiny deepseek")
    page.set_input_files("#checkpoint-files", str(archive))
    page.click("form[data-testid=checkpoint-upload] button[type=submit]")
    page.wait_for_selector("[data-testid=checkpoint-family]")
    assert "DeepseekV3ForCausalLM" in page.inner_text("[data-testid=checkpoint-family]")
    assert '"attention": "mla"' in page.inner_text("[data-testid=checkpoint-spec]")
    page.screenshot(path=str(artifacts / "checkpoint-detail.png"), full_page=True)

    page.click("[data-testid=checkpoint-configure]")
    page.wait_for_url("**/jobs/new/**")
    assert page.locator("#id_init_checkpoint option:checked").inner_text() == "tiny deepseek (deepseek_v3)"
    page.screenshot(path=str(artifacts / "checkpoint-launch.png"), full_page=True)
