"""The engine's dropout (``workers.engine.kernels.Dropout``): ``nn.Dropout``'s distribution and contract with a CPU
mask drawn by ``uniform_``. Its speed is measured by ``python -m bench.estimates`` (the text classifier), not here."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from builder.configs.presets import PRESETS
from tests.engine.specs import merged_spec
from workers.engine.kernels import Dropout
from workers.engine.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py

N = 1_000_000


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_each_element_is_kept_with_probability_one_minus_p_and_scaled(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(N) + 0.5  # no zeros: a zero output is a dropped element
    y = Dropout(p)(x)
    kept = y != 0
    # Binomial(N, 1 - p): six standard deviations either side.
    assert abs(kept.sum().item() - N * (1 - p)) < 6 * math.sqrt(N * p * (1 - p))
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    # Unbiased, as nn.Dropout: the mean is kept.
    assert abs(y.mean().item() - x.mean().item()) < 0.01


def test_the_gradient_is_the_same_mask_and_scale() -> None:
    torch.manual_seed(1)
    x = (torch.rand(10_000) + 0.5).requires_grad_()
    y = Dropout(0.2)(x)
    y.backward(torch.ones_like(y))
    assert x.grad is not None
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.8, rtol=1e-6, atol=0)


def test_evaluation_and_p_zero_pass_through_and_the_same_seed_draws_the_same_mask() -> None:
    x = torch.randn(1000)
    layer = Dropout(0.3)
    assert torch.equal(layer.eval()(x), x) and torch.equal(Dropout(0.0)(x), x)
    layer.train()
    torch.manual_seed(7)
    first = layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), first)  # what a resumed run's restored generator relies on
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16  # autocast activations keep their dtype


def test_the_model_uses_it_and_a_plateau_intervention_still_raises_its_p() -> None:
    spec = merged_spec(PRESETS["tiny-cpu-demo"].spec.model_dump(mode="json"), model={"dropout": 0.1})
    model = build_model(spec)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(isinstance(m, Dropout) and m.p == 0.1 for m in drops)
    model.set_dropout(0.2)
    assert all(m.p == 0.2 for m in drops)
