"""The optimizers a spec chooses (``training.optimizer``), built for a model: ``build_optimizer(model, spec, device)``.

- ``adamw``: ``torch.optim.AdamW``, fused whenever torch supports it on the device (at 64 experts the default
  CPU AdamW took ~0.5 s of a ~2.1 s step, the fused one 73 ms: STACK.md);
- ``adafactor``: ``torch.optim.Adafactor`` (factored second moments: a row and a column per matrix);
- ``sgd``: ``torch.optim.SGD`` with (Nesterov) momentum;
- ``muon``: Muon for the hidden weight matrices and AdamW for the rest, as Moonlight trains. The hidden matrices
  are the attention, feed-forward, shared-expert and MTP projections (2-D, ``torch.optim.Muon``) and the routed
  experts' stacked ``(E, in, out)`` weights (``StackedMuon``: the same update applied to each expert's matrix,
  which ``torch.optim.Muon`` cannot take); AdamW (fused) gets the embeddings, the output head, the router, the
  norms and biases. The parts step together as one ``OptimizerSet``.

Weight decay (every choice): on matrices only, not on norms, biases or embeddings (Muon's own decay applies to
all its matrices). Each parameter group is created with its *peak* learning rate in ``lr``: the trainer reads
those once (``peak_learning_rates``) and sets ``lr`` every step from the schedule.

Checkpoints hold ``optimizer.state_dict()``: a plain torch state dict for one optimizer, ``{part: state dict}``
for an ``OptimizerSet``; ``load_state_dict`` restores either exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from workers.engine.model import Router
from workers.engine.spec import AdafactorSpec, AdamWSpec, MuonSpec, SGDSpec, Spec

# Keller Jordan's quintic Newton-Schulz coefficients, as torch.optim.Muon uses them.
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_NS_EPS = 1e-7


# ----------------------------------------------------------------------------------------------------------
# Muon for stacked expert matrices
# ----------------------------------------------------------------------------------------------------------


def orthogonalize(update: Tensor, steps: int) -> Tensor:
    """Newton-Schulz orthogonalisation of each matrix of ``update`` ``(..., m, n)``, as ``torch.optim.Muon`` does
    for one matrix (in bf16, on the wide orientation, each matrix scaled to spectral norm ≤ 1 by its own
    Frobenius norm): roughly ``U V^T`` of each matrix's SVD ``U S V^T``. Returns bf16 ``(..., m, n)``."""
    a, b, c = _NS_COEFFICIENTS
    shape = update.shape
    x = update.reshape(-1, shape[-2], shape[-1]).bfloat16()  # (S, m, n)
    tall = shape[-2] > shape[-1]
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=_NS_EPS)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)  # (S, k, k) with k the smaller side
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·gram + c·gram²
        x = torch.baddbmm(x, gram_update, x, beta=a)  # a·x + gram_update·x
    return (x.mT if tall else x).reshape(shape)


def muon_lr_ratio(adjust: str, fan_out: int, fan_in: int) -> float:
    """The per-matrix learning-rate scale of ``torch.optim.Muon`` (its ``adjust_lr_fn``) for an ``(out, in)``
    matrix."""
    if adjust == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    return math.sqrt(max(1.0, fan_out / fan_in))


class StackedMuon(torch.optim.Optimizer):
    """Muon for stacks of matrices ``(E, in, out)`` (the routed experts' weights): ``torch.optim.Muon``'s update
    applied to each ``(in, out)`` matrix of the stack, all experts in one batched Newton-Schulz iteration.

    Per step, for each stack ``W`` with gradient ``G``: ``B = momentum·B + (1 - momentum)·G`` (torch's ``lerp``
    form), ``U = lerp(G, B, momentum)`` with Nesterov else ``B``, ``W *= 1 - lr·weight_decay``,
    ``W -= lr·ratio·orthogonalize(U)`` where ``ratio`` is torch's ``adjust_lr_fn`` for an ``(out, in)`` matrix
    (an ``nn.Linear`` stores ``(out, in)``; the stacks store ``(in, out)`` so that the grouped matmul needs no
    transpose). One state per parameter: ``momentum_buffer``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        ns_steps: int,
        adjust_lr: str,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "ns_steps": ns_steps,
            "adjust_lr": adjust_lr,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 3:
                    raise ValueError(
                        f"StackedMuon takes (E, in, out) stacks, not a parameter of shape {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf: Tensor = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                ortho = orthogonalize(update, group["ns_steps"])  # (E, in, out) bf16
                ratio = muon_lr_ratio(group["adjust_lr"], fan_out=p.shape[2], fan_in=p.shape[1])
                p.mul_(1 - lr * decay)
                p.add_(ortho, alpha=-lr * ratio)
        return loss


# ----------------------------------------------------------------------------------------------------------
# Several optimizers stepping as one
# ----------------------------------------------------------------------------------------------------------


class OptimizerSet:
    """Optimizers over disjoint parameters that step, zero and checkpoint as one.

    It quacks like a ``torch.optim.Optimizer`` where the trainer, ``GradScaler`` (``unscale_`` walks
    ``param_groups``; ``step`` calls ``step()``) and checkpoints need it: ``param_groups`` is every part's
    groups (the same dicts, so setting ``lr`` on them reaches the parts), ``state_dict()`` is
    ``{part name: the part's state dict}``.
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer]) -> None:
        self.parts = parts

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self) -> dict[Tensor, Any]:
        return {p: s for part in self.parts.values() for p, s in part.state.items()}

    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            raise ValueError("an OptimizerSet steps without a closure")
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != set(self.parts):
            raise ValueError(f"optimizer state for parts {sorted(state_dict)}, expected {sorted(self.parts)}")
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])


Optimizer = torch.optim.Optimizer | OptimizerSet


def peak_learning_rates(optimizer: Optimizer) -> list[float]:
    """Each parameter group's peak learning rate: its ``lr`` as ``build_optimizer`` made it (read before any
    step or checkpoint load changes it)."""
    return [float(group["lr"]) for group in optimizer.param_groups]


# ----------------------------------------------------------------------------------------------------------
# Which parameter goes where
# ----------------------------------------------------------------------------------------------------------


def _ids(params: Iterable[Tensor]) -> set[int]:
    return {id(p) for p in params}


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's trainable parameters by role, in ``model.parameters()`` order, each exactly once:

    - ``hidden_matrices``: 2-D weights of the blocks' and MTP modules' linear maps (attention, feed-forward,
      shared experts, MTP projections);
    - ``expert_stacks``: the routed experts' stacked ``(E, in, out)`` weights;
    - ``other_matrices``: the output head, classifier and router weights (2-D, not hidden);
    - ``embeddings``: input embeddings (and the head tied to them);
    - ``vectors``: norms and biases (1-D).
    """
    embeddings = _ids(m.weight for m in model.modules() if isinstance(m, nn.Embedding))
    not_hidden = _ids(m.weight for m in model.modules() if isinstance(m, Router))
    for name in ("lm_head", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            not_hidden |= _ids(head.parameters())
    out: dict[str, list[nn.Parameter]] = {
        "hidden_matrices": [],
        "expert_stacks": [],
        "other_matrices": [],
        "embeddings": [],
        "vectors": [],
    }
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in embeddings:
            out["embeddings"].append(p)
        elif p.ndim < 2:
            out["vectors"].append(p)
        elif id(p) in not_hidden:
            out["other_matrices"].append(p)
        elif p.ndim == 3:
            out["expert_stacks"].append(p)
        else:
            out["hidden_matrices"].append(p)
    return out


def _decay_groups(
    decay: Sequence[nn.Parameter], no_decay: Sequence[nn.Parameter], weight_decay: float
) -> list[dict[str, Any]]:
    return [
        {"params": list(decay), "weight_decay": weight_decay},
        {"params": list(no_decay), "weight_decay": 0.0},
    ]


def _adamw(groups: list[dict[str, Any]], device: torch.device, **kwargs: Any) -> torch.optim.AdamW:
    try:
        return torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"), **kwargs)
    except (RuntimeError, ValueError):
        # Older torch or an unusual dtype: the multi-tensor path is correct, only slower.
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def build_optimizer(model: nn.Module, spec: Spec, device: torch.device) -> Optimizer:
    """The optimizer ``spec.training.optimizer`` names, over ``model``'s trainable parameters (module docstring).

    Groups are created with their peak learning rates; AdamW (alone or as Muon's partner) keeps the param
    group layout it always had: ``[matrices with decay, the rest without]``.
    """
    o = spec.training.optimizer
    roles = split_parameters(model)
    matrices = roles["hidden_matrices"] + roles["expert_stacks"] + roles["other_matrices"]
    # model.parameters() order inside each group, as before the roles existed (checkpoints index by position).
    order = {id(p): i for i, p in enumerate(model.parameters())}
    matrices.sort(key=lambda p: order[id(p)])
    rest = sorted(roles["embeddings"] + roles["vectors"], key=lambda p: order[id(p)])

    if isinstance(o, AdamWSpec):
        groups = _decay_groups(matrices, rest, o.weight_decay)
        return _adamw(groups, device, lr=o.lr, betas=o.betas, eps=o.eps)
    if isinstance(o, AdafactorSpec):
        return torch.optim.Adafactor(
            _decay_groups(matrices, rest, o.weight_decay),
            lr=o.lr,
            beta2_decay=o.beta2_decay,
            eps=(None, o.eps),
            d=o.clip_threshold,
            foreach=True,
        )
    if isinstance(o, SGDSpec):
        return torch.optim.SGD(
            _decay_groups(matrices, rest, o.weight_decay),
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            foreach=True,
        )
    assert isinstance(o, MuonSpec)
    parts: dict[str, torch.optim.Optimizer] = {}
    if roles["hidden_matrices"]:
        parts["muon"] = torch.optim.Muon(
            roles["hidden_matrices"],
            lr=o.lr,
            weight_decay=o.weight_decay,
            momentum=o.momentum,
            nesterov=o.nesterov,
            ns_steps=o.ns_steps,
            adjust_lr_fn=o.adjust_lr,
        )
    if roles["expert_stacks"]:
        parts["muon_experts"] = StackedMuon(
            roles["expert_stacks"],
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
            ns_steps=o.ns_steps,
            adjust_lr=o.adjust_lr,
        )
    adamw_groups = _decay_groups(roles["other_matrices"], rest, o.adamw_weight_decay)
    parts["adamw"] = _adamw(adamw_groups, device, lr=o.adamw_lr, betas=o.adamw_betas, eps=1e-8)
    return OptimizerSet(parts)


def as_torch_optimizer(optimizer: Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` typed for ``GradScaler`` (which only walks ``param_groups`` and calls ``step``)."""
    return cast(torch.optim.Optimizer, optimizer)
