"""The configs API: CRUD with versions and diffs, validate/estimate/schema, templates, hardware, OpenAPI.

Every error names its field path; every endpoint that touches a config is checked with charlie (the
outsider), who must get a 404 exactly as for a config that does not exist.
"""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from builder.configs.models import Config, ConfigVersion
from builder.configs.presets import PRESETS
from tests.conftest import signed_in
from workers.engine.estimate import count_parameters
from workers.engine.spec import json_schema, load_spec

pytestmark = pytest.mark.django_db

TINY: dict[str, Any] = {
    "model": {
        "vocab_size": 512,
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "max_seq_len": 64,
        "moe": {"num_routed_experts": 4, "top_k": 2, "expert_hidden_size": 64},
    },
    "training": {"batch_size": 4, "max_steps": 50, "schedule": {"warmup_steps": 5}},
    "data": {"seq_len": 64},
}


def paths(response: Any) -> list[str]:
    return [e["path"] for e in response.json()["errors"]]


def make_config(user: Any, name: str = "tiny") -> dict[str, Any]:
    response = signed_in(user, APIClient).post(
        "/api/configs", {"name": name, "description": "d", "spec": TINY}, format="json"
    )
    assert response.status_code == 201, response.json()
    body: dict[str, Any] = response.json()
    return body


def test_create_list_and_read_a_config(alice: Any) -> None:
    client = signed_in(alice, APIClient)
    body = make_config(alice)
    assert body["latest_version"] == 1 and body["versions"] == 1
    # Stored complete: defaults filled in, equal to what the engine would load.
    assert body["spec"] == load_spec(TINY).model_dump(mode="json")
    listing = client.get("/api/configs").json()
    assert [c["name"] for c in listing] == ["tiny"]
    assert client.get(f"/api/configs/{body['id']}").json()["description"] == "d"
    version = client.get(f"/api/configs/{body['id']}/versions/1").json()
    assert version["number"] == 1 and version["source"] == "api"


@pytest.mark.parametrize(
    ("spec", "expected", "status"),
    [
        # What the published JSON Schema says is refused 400; a rule between fields, which it cannot say, 422.
        ({"model": {"moe": {"top_k": 0}}}, "spec.model.moe.top_k", 400),  # a bound
        ({"model": {"moe": {"num_routed_experts": 2, "top_k": 4}}}, "spec.model.moe.top_k", 422),  # cross-field
        ({"model": {"hidden_size": 250, "num_heads": 4}}, "spec.model.num_heads", 422),  # heads must divide
        ({"model": {"bogus": 1}}, "spec.model.bogus", 400),  # unknown key
        ({"training": {"precision": "fp8"}}, "spec.training.precision", 400),  # enum
        ({"training": {"optimizer": {"betas": [0.9, 1.5]}}}, "spec.training.optimizer.betas.1", 400),
        ([1, 2], "spec", 400),  # not an object
    ],
)
def test_errors_name_the_field_path(alice: Any, spec: Any, expected: str, status: int) -> None:
    response = signed_in(alice, APIClient).post("/api/configs", {"name": "x", "spec": spec}, format="json")
    assert response.status_code == status
    assert expected in paths(response), response.json()
    assert all(e["message"] for e in response.json()["errors"])
    assert not Config.objects.exists()


def test_missing_fields_and_taken_names_are_named(alice: Any, charlie: Any) -> None:
    client = signed_in(alice, APIClient)
    response = client.post("/api/configs", {"spec": TINY}, format="json")
    assert response.status_code == 400 and paths(response) == ["name"]
    make_config(alice, "mine")
    response = client.post("/api/configs", {"name": "mine", "spec": TINY}, format="json")
    assert response.status_code == 409 and paths(response) == ["name"]  # well-formed, but the name is taken
    make_config(charlie, "mine")  # names are per owner


def test_every_save_is_a_new_version_and_versions_diff(alice: Any) -> None:
    client = signed_in(alice, APIClient)
    config = make_config(alice)
    cid = config["id"]
    changed = {**TINY, "training": {**TINY["training"], "batch_size": 8}}
    response = client.post(f"/api/configs/{cid}/versions", {"spec": changed, "note": "bigger batch"}, format="json")
    assert response.status_code == 201 and response.json()["number"] == 2
    more = {**changed, "model": {**TINY["model"], "num_layers": 3}}
    response = client.patch(f"/api/configs/{cid}", {"spec": more, "description": "three layers"}, format="json")
    assert response.status_code == 200
    assert response.json()["latest_version"] == 3 and response.json()["description"] == "three layers"
    # Renaming alone does not make a version.
    assert client.patch(f"/api/configs/{cid}", {"name": "renamed"}, format="json").json()["latest_version"] == 3
    versions = client.get(f"/api/configs/{cid}/versions").json()
    assert [v["number"] for v in versions] == [1, 2, 3]
    assert versions[1]["note"] == "bigger batch"
    diff = client.get(f"/api/configs/{cid}/diff?a=1&b=3").json()
    assert {c["path"]: (c["before"], c["after"]) for c in diff["changes"]} == {
        "model.num_layers": (2, 3),
        "training.batch_size": (4, 8),
    }
    assert client.get(f"/api/configs/{cid}/diff?a=2&b=2").json()["changes"] == []
    bad = client.get(f"/api/configs/{cid}/diff?a=1&b=9")
    assert bad.status_code == 404 and paths(bad) == ["b"]  # a version that does not exist
    assert paths(client.get(f"/api/configs/{cid}/diff?b=1")) == ["a"]
    # A bad spec on PATCH makes no version and names the field.
    response = client.patch(f"/api/configs/{cid}", {"spec": {"model": {"num_layers": 0}}}, format="json")
    assert response.status_code == 400 and paths(response) == ["spec.model.num_layers"]
    assert ConfigVersion.objects.filter(config_id=cid).count() == 3


def test_validate_reports_errors_and_advice(alice: Any) -> None:
    client = signed_in(alice, APIClient)
    ok = client.post("/api/specs/validate", {"spec": TINY}, format="json").json()
    assert ok["valid"] and ok["errors"] == [] and ok["spec"]["model"]["num_layers"] == 2
    bad = client.post(
        "/api/specs/validate",
        {"spec": {"model": {"hidden_size": 250, "num_heads": 6}, "training": {"schedule": {"warmup_steps": 0}}}},
        format="json",
    ).json()
    assert not bad["valid"] and bad["spec"] is None
    assert "model.num_heads" in [e["path"] for e in bad["errors"]]
    codes = {w["code"]: w for w in bad["warnings"]}
    # Advice still comes for a spec that breaks a cross-field rule, with what to change.
    assert codes["heads_divide_hidden"]["path"] == "model.num_heads" and codes["heads_divide_hidden"]["fix"]
    assert "no_warmup" in codes
    malformed = client.post("/api/specs/validate", {"hardware": "tpu"}, format="json")
    assert malformed.status_code == 400 and set(paths(malformed)) == {"spec", "hardware"}


def test_estimate_predicts_and_names_bad_fields(alice: Any) -> None:
    client = signed_in(alice, APIClient)
    response = client.post("/api/specs/estimate", {"spec": TINY, "hardware": "t4"}, format="json")
    assert response.status_code == 200
    est = response.json()["estimate"]
    assert est["parameters"]["total"] == count_parameters(load_spec(TINY))
    assert est["hardware"] == "t4" and est["risk"]["level"] == "fits"
    memory = est["memory"]
    assert memory["peak"] == pytest.approx(
        memory["weights"] + memory["gradients"] + memory["optimizer"] + memory["activations"] + memory["runtime"]
    )
    assert est["time"]["step_seconds"] > 0 and est["flops"]["training_per_token"] > 0
    assert {(r["precision"], r["checkpointing"]) for r in est["memory_table"]} == {
        (p, c) for p in ("fp32", "bf16", "fp16") for c in (False, True)
    }
    warnings = response.json()["warnings"]
    assert any(w["code"] == "fp32_on_gpu" for w in warnings)  # the hardware-aware advice
    bad = client.post(
        "/api/specs/estimate", {"spec": {"model": {"num_layers": -1}}, "hardware": "tpu", "num_gpus": 0}, format="json"
    )
    assert bad.status_code == 400
    assert set(paths(bad)) == {"spec.model.num_layers", "hardware", "num_gpus"}
    too_many = client.post("/api/specs/estimate", {"spec": TINY, "hardware": "t4", "num_gpus": 9}, format="json")
    # Both values are well-formed; the profile allows at most 8: a rule between them, 422.
    assert too_many.status_code == 422 and paths(too_many) == ["num_gpus"]


def test_schema_templates_and_hardware(alice: Any) -> None:
    client = signed_in(alice, APIClient)
    assert client.get("/api/specs/schema").json() == json_schema()
    templates = client.get("/api/templates").json()
    assert [t["name"] for t in templates] == list(PRESETS)
    assert {"tiny-cpu-demo", "small-moe", "moe-1b", "text-classifier"} <= set(PRESETS)
    one = client.get("/api/templates/moe-1b").json()
    assert one["spec"]["model"]["num_layers"] == 24 and one["spec"]["model"]["vocab_size"] == 50265
    assert client.get("/api/templates/nope").status_code == 404
    # A card says what the template is in a few sentences; the measurements behind it are its "why".
    assert all(len(t["description"]) <= 400 for t in templates), [len(t["description"]) for t in templates]
    assert "bench.learning" in client.get("/api/templates/tiny-cpu-demo").json()["why"] and one["why"] == ""
    page = signed_in(alice).get("/configure/").content.decode()
    assert 'data-testid="why-tiny-cpu-demo"' in page and 'data-testid="why-moe-1b"' not in page
    hardware = {h["key"]: h for h in client.get("/api/hardware").json()}
    assert set(hardware) == {"cpu", "t4", "a10", "a100-40gb", "a100-80gb", "h100-80gb"}
    assert hardware["t4"]["peak_flops"]["bf16"] is None and hardware["cpu"]["calibration_factor"] == 1.0


def test_the_optimizer_is_a_choice_by_name_in_both_published_schemas(alice: Any) -> None:
    """The JSON Schema and the OpenAPI components say that ``name`` chooses the optimizer (the editor completes
    and checks the chosen optimizer's fields by it), each name mapped to the schema whose name it is."""
    client = signed_in(alice, APIClient)
    published = client.get("/api/specs/schema").json()
    openapi = client.get("/api/schema", HTTP_ACCEPT="application/json").json()["components"]["schemas"]
    for defs, training in (
        (published["$defs"], published["$defs"]["TrainingSpec"]),
        (openapi, openapi["TrainingSpec"]),
    ):
        optimizer = training["properties"]["optimizer"]
        discriminator = optimizer["discriminator"]
        assert discriminator["propertyName"] == "name"
        assert set(discriminator["mapping"]) == {"adamw", "adafactor", "sgd", "muon"}
        assert sorted(discriminator["mapping"].values()) == sorted(choice["$ref"] for choice in optimizer["oneOf"])
        for name, ref in discriminator["mapping"].items():
            assert defs[ref.rsplit("/", 1)[-1]]["properties"]["name"]["const"] == name


def test_every_endpoint_is_in_the_openapi_schema(alice: Any) -> None:
    client = signed_in(alice, APIClient)
    schema = client.get("/api/schema", HTTP_ACCEPT="application/json").json()
    for p in (
        "/api/configs",
        "/api/configs/{config_id}",
        "/api/configs/{config_id}/versions",
        "/api/configs/{config_id}/versions/{number}",
        "/api/configs/{config_id}/diff",
        "/api/specs/validate",
        "/api/specs/estimate",
        "/api/specs/schema",
        "/api/templates",
        "/api/templates/{name}",
        "/api/hardware",
        "/api/hardware/calibrations",
        "/api/hardware/calibrations/{calibration_id}",
    ):
        assert p in schema["paths"], p
    assert client.get("/api/docs").status_code == 200


def test_the_outsider_cannot_see_or_change_configs(alice: Any, charlie: Any) -> None:
    config = make_config(alice)
    cid = config["id"]
    outsider = signed_in(charlie, APIClient)
    assert outsider.get("/api/configs").json() == []
    for response in (
        outsider.get(f"/api/configs/{cid}"),
        outsider.patch(f"/api/configs/{cid}", {"name": "stolen"}, format="json"),
        outsider.delete(f"/api/configs/{cid}"),
        outsider.get(f"/api/configs/{cid}/versions"),
        outsider.post(f"/api/configs/{cid}/versions", {"spec": TINY}, format="json"),
        outsider.get(f"/api/configs/{cid}/versions/1"),
        outsider.get(f"/api/configs/{cid}/diff?a=1&b=1"),
    ):
        assert response.status_code == 404
    # Same answer as for a config that does not exist.
    assert outsider.get("/api/configs/999999").status_code == 404
    assert Config.objects.get(pk=cid).name == "tiny" and ConfigVersion.objects.filter(config_id=cid).count() == 1
    assert signed_in(alice, APIClient).delete(f"/api/configs/{cid}").status_code == 204
    assert not Config.objects.filter(pk=cid).exists()


def test_anonymous_requests_are_refused() -> None:
    client = APIClient()
    for url in ("/api/configs", "/api/specs/schema", "/api/templates", "/api/hardware"):
        assert client.get(url).status_code == 401
    assert client.post("/api/specs/validate", {"spec": TINY}, format="json").status_code == 401
