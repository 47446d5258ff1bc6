"""The spec parses strictly where a person could be misled: integers are integers, booleans are booleans, numbers
are numbers; every refusal names the field. (An integer is still accepted where a float is asked for.)"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from workers.engine.spec import load_spec, spec_errors

REFUSED = [
    ({"model": {"num_layers": "2"}}, "model.num_layers"),
    ({"model": {"num_layers": True}}, "model.num_layers"),
    ({"model": {"num_layers": 2.5}}, "model.num_layers"),
    ({"model": {"moe": {"top_k": "1"}}}, "model.moe.top_k"),
    ({"model": {"tie_embeddings": 1}}, "model.tie_embeddings"),
    ({"model": {"tie_embeddings": "true"}}, "model.tie_embeddings"),
    ({"training": {"max_steps": "100"}}, "training.max_steps"),
    ({"training": {"gradient_checkpointing": 0}}, "training.gradient_checkpointing"),
    ({"training": {"optimizer": {"lr": "3e-4"}}}, "training.optimizer"),
    ({"training": {"optimizer": {"betas": ["0.9", 0.99]}}}, "training.optimizer"),
    ({"training": {"optimizer": {"betas": [True, 0.99]}}}, "training.optimizer"),
]


@pytest.mark.parametrize(("raw", "path"), REFUSED)
def test_a_value_of_the_wrong_type_is_refused_at_its_field(raw: dict[str, Any], path: str) -> None:
    with pytest.raises(ValidationError) as refused:
        load_spec(raw)
    paths = [e["path"] for e in spec_errors(refused.value)]
    assert any(p.startswith(path) for p in paths), paths


def test_a_float_that_holds_an_integer_is_that_integer() -> None:
    # JSON Schema (the published one) counts 2.0 as an integer: the spec reads it as 2, at any depth.
    spec = load_spec({"model": {"num_layers": 2.0, "moe": {"top_k": 1.0}}, "data": {"seq_len": 128.0}})
    assert (spec.model.num_layers, spec.model.moe.top_k, spec.data.seq_len) == (2, 1, 128)
    assert isinstance(spec.model.num_layers, int)


def test_json_numbers_and_lists_still_parse() -> None:
    spec = load_spec({"training": {"optimizer": {"lr": 1, "betas": [0.9, 0.99]}, "grad_clip": 2}})
    assert spec.training.optimizer.lr == 1.0 and isinstance(spec.training.optimizer.lr, float)
    assert spec.training.optimizer.betas == (0.9, 0.99)  # type: ignore[union-attr]
