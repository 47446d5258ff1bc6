"""The optimizer choices (workers/engine/optimizers.py): which parameters each updates, how much state it keeps
(as the estimator predicts), and Muon for stacked expert weights against torch's Muon."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
import torch

from workers.engine.estimate import optimizer_state_elements, parameter_shapes
from workers.engine.model import build_model
from workers.engine.optimizers import (
    OptimizerSet,
    StackedMuon,
    build_optimizer,
    peak_learning_rates,
    split_parameters,
)
from workers.engine.spec import Spec

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py

CPU = torch.device("cpu")


def make_spec(optimizer: dict[str, Any] | None = None, **model: Any) -> Spec:
    m: dict[str, Any] = {
        "vocab_size": 300,
        "num_layers": 2,
        "hidden_size": 32,
        "num_heads": 4,
        "max_seq_len": 32,
        "moe": {"num_routed_experts": 4, "top_k": 2, "expert_hidden_size": 16, "first_dense_layers": 1},
        **model,
    }
    return Spec.model_validate(
        {"model": m, "training": {"optimizer": optimizer or {}}, "data": {"tokenizer": "bytes", "seq_len": 16}}
    )


SHAPES = {
    "tied-mha": make_spec(),
    "untied-mla-mtp": make_spec(
        tie_embeddings=False, attention="mla", mla={"q_lora_rank": 8, "kv_lora_rank": 12}, mtp_depth=1
    ),
    "classifier-layernorm": make_spec(task="classification", num_labels=3, norm="layernorm"),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_parameter_roles_are_the_estimators(name: str) -> None:
    """The estimator's shapes by role (pure Python, for the web) are the model's as the optimizers split it."""
    spec = SHAPES[name]
    roles = split_parameters(build_model(spec))
    built = Counter((role, tuple(p.shape)) for role, params in roles.items() for p in params)
    predicted: Counter[tuple[str, tuple[int, ...]]] = Counter()
    for shape in parameter_shapes(spec):
        predicted[(shape.role, shape.shape)] += shape.count
    assert built == predicted
    # Routers, heads and embeddings are never Muon's: Moonlight keeps them on AdamW.
    model = build_model(spec)
    roles = split_parameters(model)
    hidden = {id(p) for p in roles["hidden_matrices"] + roles["expert_stacks"]}
    for pname, p in model.named_parameters():
        if any(part in pname for part in ("router", "embed", "lm_head", "classifier", "norm")):
            assert id(p) not in hidden, pname


def _one_step(spec: Spec) -> Any:
    torch.manual_seed(0)
    model = build_model(spec)
    optimizer = build_optimizer(model, spec, CPU)
    ids = torch.randint(0, 300, (2, 16))
    labels = torch.tensor([0, 2]) if spec.model.task == "classification" else ids
    out = model(ids, labels=labels)
    assert out.loss is not None
    out.loss.backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd", "muon"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_optimizer_state_is_what_the_estimator_predicts(name: str, optimizer: str) -> None:
    raw = SHAPES[name].model_dump(mode="json")
    raw["training"]["optimizer"] = {"name": optimizer}
    spec = Spec.model_validate(raw)
    _, opt = _one_step(spec)
    states = opt.state.values()
    held = sum(v.numel() for state in states for key, v in state.items() if key != "step")
    assert held == optimizer_state_elements(spec)


def test_the_optimizer_state_per_choice_by_hand() -> None:
    spec = make_spec()
    n = sum(s.numel for s in parameter_shapes(spec))
    assert optimizer_state_elements(spec) == 2 * n
    assert optimizer_state_elements(make_spec({"name": "sgd"})) == n
    muon = sum(s.numel for s in parameter_shapes(spec) if s.role in ("hidden_matrices", "expert_stacks"))
    assert optimizer_state_elements(make_spec({"name": "muon"})) == muon + 2 * (n - muon)
    factored = optimizer_state_elements(make_spec({"name": "adafactor"}))
    assert factored < n / 10  # rows and columns instead of every entry
    # Expert parallelism shards the routed experts' state with them.
    expert_state = 2 * sum(s.numel for s in parameter_shapes(spec) if s.component == "routed_experts")
    assert optimizer_state_elements(spec, 4, "expert") == 2 * n - expert_state + expert_state // 4


def test_stacked_muon_is_torch_muon_on_each_expert_matrix() -> None:
    torch.manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(3, 12, 20))  # (E, in, out): as the experts store them
    # torch.optim.Muon on the same matrices in nn.Linear's (out, in) layout
    per_expert = [torch.nn.Parameter(stack[e].detach().t().clone()) for e in range(3)]
    for adjust in ("original", "match_rms_adamw"):
        ours = StackedMuon(
            [stack], lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, ns_steps=5, adjust_lr=adjust
        )
        theirs = torch.optim.Muon(per_expert, lr=0.05, momentum=0.9, weight_decay=0.1, adjust_lr_fn=adjust)
        for _ in range(3):
            grad = torch.randn(3, 12, 20)
            stack.grad = grad
            for e, p in enumerate(per_expert):
                p.grad = grad[e].t().contiguous()
            ours.step()
            theirs.step()
        for e in range(3):
            torch.testing.assert_close(stack.detach()[e].t(), per_expert[e].detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            ours.state[stack]["momentum_buffer"][1].t(), theirs.state[per_expert[1]]["momentum_buffer"]
        )
    with pytest.raises(ValueError, match="stacks"):
        StackedMuon([torch.nn.Parameter(torch.randn(3, 4))], 0.1, 0.9, True, 0.0, 5, "original")


def test_muon_steps_as_one_set_and_keeps_every_group_s_peak() -> None:
    spec = make_spec({"name": "muon", "lr": 0.02, "adamw_lr": 3e-3, "adamw_weight_decay": 0.05})
    model, opt = _one_step(spec)
    assert isinstance(opt, OptimizerSet)
    assert list(opt.parts) == ["muon", "muon_experts", "adamw"]
    assert peak_learning_rates(opt) == [0.02, 0.02, 3e-3, 3e-3]
    assert [g["weight_decay"] for g in opt.parts["adamw"].param_groups] == [0.05, 0.0]
    # param_groups are the parts' own dicts: setting an lr there reaches the part
    opt.param_groups[-1]["lr"] = 1.0
    assert opt.parts["adamw"].param_groups[-1]["lr"] == 1.0
    # Its state dict round-trips into a fresh set built for the same model.
    state = copy.deepcopy(opt.state_dict())
    fresh = build_optimizer(model, spec, CPU)
    fresh.load_state_dict(state)
    assert isinstance(fresh, OptimizerSet)
    for name, part in fresh.parts.items():
        for p, s in part.state.items():
            for key, value in s.items():
                assert torch.equal(value, opt.parts[name].state[p][key]), (name, key)
    with pytest.raises(ValueError, match="parts"):
        fresh.load_state_dict({"adamw": state["adamw"]})


def test_adamw_keeps_its_groups_and_fused_kernel() -> None:
    spec = make_spec({"lr": 1e-3, "weight_decay": 0.1})
    model = build_model(spec)
    opt = build_optimizer(model, spec, CPU)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    decay, no_decay = opt.param_groups
    embeddings = {id(model.embed.weight)}
    assert [id(p) for p in decay["params"]] == [
        id(p) for p in model.parameters() if p.ndim >= 2 and id(p) not in embeddings
    ]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    sgd = build_optimizer(model, make_spec({"name": "sgd", "momentum": 0.8}), CPU)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
