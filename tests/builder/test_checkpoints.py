"""Imported checkpoints (builder/checkpoints): a Hugging Face folder uploaded as files or as a zip, checked (names,
size, config, derived spec, tensors: nothing unpickled), its owner's alone; a job that names it starts from its
weights and tokenizer, on a real worker."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from safetensors.torch import load_file

from builder.checkpoints.models import ImportedCheckpoint
from builder.datasets.models import Dataset
from builder.jobs.files import job_layout
from builder.jobs.models import JobEvent
from tests.builder.test_jobs import corpus, dataset, wait_state  # noqa: F401  (fixtures)
from tests.conftest import signed_in
from tests.services import Stack
from workers.engine.data import build_byte_tokenizer
from workers.engine.hf import write_hf_folder
from workers.engine.model import build_model
from workers.engine.spec import Spec

MODEL = {
    "vocab_size": 260, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "max_seq_len": 32,
    "moe": {"num_routed_experts": 4, "num_shared_experts": 1, "top_k": 2, "expert_hidden_size": 32,
            "scoring": "sigmoid"},
}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GLM-4-MoE folder of a tiny random model with the byte tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    build_byte_tokenizer().save(str(root / "tokenizer.json"))
    spec = Spec.model_validate({"model": MODEL, "data": {"seq_len": 32}})
    torch.manual_seed(0)
    write_hf_folder(spec.model, build_model(spec).state_dict(), root / "folder", tokenizer=root / "tokenizer.json")
    return root / "folder"


def files_of(folder: Path, *extra: tuple[str, bytes]) -> list[SimpleUploadedFile]:
    parts = [SimpleUploadedFile(p.name, p.read_bytes()) for p in sorted(folder.iterdir())]
    return parts + [SimpleUploadedFile(name, data) for name, data in extra]


def zipped(folder: Path, prefix: str = "", *extra: tuple[str, bytes]) -> SimpleUploadedFile:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{prefix}{path.name}")
        for name, data in extra:
            archive.writestr(name, data)
    return SimpleUploadedFile("checkpoint.zip", buffer.getvalue(), content_type="application/zip")


def upload(client: Client, files: list[SimpleUploadedFile], name: str = "tiny glm") -> Any:
    return client.post("/api/checkpoints", {"name": name, "files": files})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.django_db
def test_a_folder_uploads_as_files_or_as_a_zip_and_only_its_owner_sees_it(
    folder: Path, alice: Any, bob: Any, charlie: Any, media_root: Path
) -> None:
    owner = signed_in(alice)
    answer = upload(owner, files_of(folder))
    assert answer.status_code == 201, answer.content
    made = answer.json()
    assert made["family"] == "glm4_moe" and made["architecture"] == "Glm4MoeForCausalLM"
    assert made["files"] == sorted(p.name for p in folder.iterdir())
    assert made["weights_sha256"] == sha((folder / "model.safetensors").read_bytes())
    # The derived spec, validated: GLM's routing and attention as the engine names them.
    assert made["spec"]["model"]["moe"]["scoring"] == "sigmoid" and made["spec"]["model"]["attention"] == "mha"
    assert made["spec"]["model"]["hidden_size"] == 32 and made["spec"]["data"]["seq_len"] == 32

    # The report's download (files inside one folder) uploads as it is.
    again = upload(owner, [zipped(folder, "job-3-step-20/")])
    assert again.status_code == 201, again.content
    assert again.json()["weights_sha256"] == made["weights_sha256"]

    assert owner.get(f"/api/checkpoints/{made['id']}").status_code == 200
    for other in (signed_in(bob), signed_in(charlie)):
        assert other.get(f"/api/checkpoints/{made['id']}").status_code == 404
        assert other.delete(f"/api/checkpoints/{made['id']}").status_code == 404
        assert other.get("/api/checkpoints").json() == []
    assert Client().get("/api/checkpoints").status_code == 401
    assert owner.delete(f"/api/checkpoints/{again.json()['id']}").status_code == 204
    assert [c["id"] for c in owner.get("/api/checkpoints").json()] == [made["id"]]


PICKLE = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00K\x01."  # would run code if unpickled


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("files", "pytorch_model.bin"),
        ("files", "optimizer.pt"),
        ("zip", "training_args.bin"),
        ("zip", "../escape.json"),
        ("zip", "deep/er/config.json"),
    ],
)
def test_anything_but_json_and_safetensors_is_refused_by_name(
    kind: str, name: str, folder: Path, alice: Any, media_root: Path
) -> None:
    files = files_of(folder, (name, PICKLE)) if kind == "files" else [zipped(folder, "", (name, PICKLE))]
    answer = upload(signed_in(alice), files)
    assert answer.status_code == 422, answer.content
    assert name.split("/")[-1] in answer.json()["files"][0] or name in answer.json()["files"][0]
    assert not ImportedCheckpoint.objects.exists()


@pytest.mark.django_db
def test_config_and_spec_problems_name_their_key_and_the_size_limit_is_413(
    folder: Path, alice: Any, media_root: Path, tmp_path: Path, settings: Any
) -> None:
    owner = signed_in(alice)

    def with_config(**changes: Any) -> list[SimpleUploadedFile]:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        return [f for f in files_of(folder) if f.name != "config.json"] + [
            SimpleUploadedFile("config.json", json.dumps(config).encode())
        ]

    answer = upload(owner, with_config(use_qk_norm=True))
    assert answer.status_code == 422 and "config.use_qk_norm" in answer.json(), answer.content
    answer = upload(owner, with_config(model_type="llama"))
    assert answer.status_code == 422 and "config.model_type" in answer.json()
    answer = upload(owner, with_config(num_experts_per_tok=9))  # more experts per token than there are
    assert answer.status_code == 422 and "spec.model.moe.top_k" in answer.json(), answer.content
    answer = upload(owner, with_config(moe_intermediate_size=16))  # the experts' weights are 32 wide
    assert answer.status_code == 422, answer.content
    message = answer.json()["files"][0]
    assert message.startswith("model.safetensors: layers.") and "shape" in message, message
    foreign = json.loads((folder / "tokenizer.json").read_text())
    foreign["added_tokens"] = [t for t in foreign["added_tokens"] if t["content"] != "<eos>"]
    no_eos = [f for f in files_of(folder) if f.name != "tokenizer.json"]
    answer = upload(owner, [*no_eos, SimpleUploadedFile("tokenizer.json", json.dumps(foreign).encode())])
    assert answer.status_code == 422 and "no <eos> token" in answer.json()["files"][0], answer.content
    missing = upload(owner, [f for f in files_of(folder) if f.name != "model.safetensors"])
    assert missing.status_code == 422 and "model.safetensors" in missing.json()["files"][0]

    # The storage quota counts imported checkpoints with the datasets.
    folder_bytes = sum(p.stat().st_size for p in folder.iterdir())
    settings.DATASET_QUOTA_BYTES = folder_bytes + 100
    assert upload(owner, files_of(folder)).status_code == 201
    over = upload(owner, files_of(folder))
    assert over.status_code == 413 and "quota" in over.json()["files"][0]
    ImportedCheckpoint.objects.all().delete()

    settings.CHECKPOINT_MAX_UPLOAD_BYTES = (folder / "model.safetensors").stat().st_size // 2
    assert upload(owner, files_of(folder)).status_code == 413
    assert upload(owner, [zipped(folder)]).status_code == 413
    assert not ImportedCheckpoint.objects.exists()


def launch_spec(derived: dict[str, Any], **model: Any) -> dict[str, Any]:
    return {
        **derived,
        "model": {**derived["model"], **model},
        "training": {"batch_size": 4, "max_steps": 4, "checkpoint_interval": 100, "eval_interval": 100,
                     "schedule": {"warmup_steps": 1}, "optimizer": {"lr": 3e-3}},
        "data": {**derived["data"], "tokenizer": "bytes", "val_fraction": 0.1},
    }  # fmt: skip


@pytest.mark.services
@pytest.mark.django_db(transaction=True)  # the job's task is sent when its row commits
def test_a_job_starts_from_the_owners_checkpoint_on_a_worker_and_nobody_elses(
    stack: Stack,
    folder: Path,
    alice: Any,
    bob: Any,
    dataset: Dataset,  # noqa: F811  (the fixture imported above)
) -> None:
    owner = signed_in(alice)
    made = upload(owner, files_of(folder)).json()
    spec = launch_spec(made["spec"], dropout=0.1)  # a training-only difference is fine
    request = {"name": "continued", "spec": spec, "dataset": dataset.pk, "init_checkpoint": made["id"]}

    stranger = signed_in(bob).post("/api/jobs", request, content_type="application/json")
    assert stranger.status_code == 422 and "init_checkpoint" in stranger.json()
    other_shape = {**request, "spec": launch_spec(made["spec"], num_layers=3)}
    refused = owner.post("/api/jobs", other_shape, content_type="application/json")
    assert refused.status_code == 422 and "spec.model.num_layers" in refused.json(), refused.content

    on_two = launch_spec(made["spec"])
    on_two["training"]["distributed"] = {"devices": 2}
    refused = owner.post("/api/jobs", {**request, "spec": on_two}, content_type="application/json")
    assert refused.status_code == 422 and "spec.training.distributed.devices" in refused.json(), refused.content

    answer = owner.post("/api/jobs", request, content_type="application/json")
    assert answer.status_code == 201, answer.content
    assert answer.json()["init_checkpoint"] == made["id"]
    job = wait_state(answer.json()["id"], {"succeeded", "failed"}, timeout=180)
    assert job.state == "succeeded", job.error
    assert JobEvent.objects.filter(job=job, kind="initialised").exists()
    # The step-0 checkpoint holds the uploaded weights: exported again, the very bytes uploaded.
    step0 = job_layout(job.pk).run.checkpoints / "step-000000"
    written = write_hf_folder(Spec.model_validate(spec).model, load_file(str(step0 / "model.safetensors")),
                              step0.parent.parent / "reexport")  # fmt: skip
    assert sha(written.files["model.safetensors"].read_bytes()) == made["weights_sha256"]
    # In use: deleting it is refused.
    assert owner.delete(f"/api/checkpoints/{made['id']}").status_code == 409


@pytest.mark.django_db
def test_the_pages_import_show_the_derived_spec_and_launch_from_a_checkpoint_for_its_owner_only(
    folder: Path,
    alice: Any,
    charlie: Any,
    dataset: Dataset,  # noqa: F811  (the fixture imported above)
    media_root: Path,
) -> None:
    owner, outsider = signed_in(alice), signed_in(charlie)
    assert 'data-testid="no-checkpoints"' in owner.get("/checkpoints/").content.decode()
    refused = owner.post("/checkpoints/", {"name": "bad", "files": files_of(folder, ("pytorch_model.bin", PICKLE))})
    assert refused.status_code == 422 and "pytorch_model.bin" in refused.content.decode()

    made = owner.post("/checkpoints/", {"name": "tiny glm", "files": files_of(folder)})
    assert made.status_code == 302
    checkpoint = ImportedCheckpoint.objects.get(owner=alice)
    page = owner.get(made["Location"]).content.decode()
    assert "Glm4MoeForCausalLM" in page and "&quot;scoring&quot;: &quot;sigmoid&quot;" in page
    assert outsider.get(made["Location"]).status_code == 404
    assert f'data-checkpoint-row="{checkpoint.pk}"' not in outsider.get("/checkpoints/").content.decode()

    launch = owner.post(f"/checkpoints/{checkpoint.pk}/configure/", {"name": "from glm"})
    assert launch.status_code == 302 and f"init_checkpoint={checkpoint.pk}" in launch["Location"]
    form = owner.get(launch["Location"]).content.decode()
    assert f'<option value="{checkpoint.pk}" selected>' in form
    version = launch["Location"].split("config_version=")[1].split("&")[0]
    # The outsider cannot start from it: not one of their choices.
    stranger = outsider.post("/jobs/new/", {"config_version": version, "dataset": dataset.pk,
                                               "init_checkpoint": checkpoint.pk})  # fmt: skip
    assert stranger.status_code == 400 and not checkpoint.jobs.exists()
    started = owner.post("/jobs/new/", {"config_version": version, "dataset": dataset.pk,
                                           "init_checkpoint": checkpoint.pk})  # fmt: skip
    assert started.status_code == 302, started.content.decode()[-2000:]
    assert checkpoint.jobs.count() == 1
