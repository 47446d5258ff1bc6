"""A launch whose predicted peak memory cannot fit its queue's hardware is refused before dispatch, with the
estimate and the fix; the same spec is accepted where it fits, and a small spec is never refused."""

from __future__ import annotations

from typing import Any

import pytest

from builder.datasets.models import Dataset
from builder.jobs.models import Job
from tests.builder.test_jobs import tiny_spec
from tests.conftest import signed_in

# 0.85 trillion parameters: valid, and far beyond any one device.
HUGE = {
    "model": {
        "vocab_size": 65536, "num_layers": 64, "hidden_size": 8192, "num_heads": 64, "max_seq_len": 1024,
        "moe": {"num_routed_experts": 256, "num_shared_experts": 1, "top_k": 8, "expert_hidden_size": 2048},
    },
    "training": {"batch_size": 1, "max_steps": 200},
    "data": {"seq_len": 1024},
}  # fmt: skip
# A model that does not fit a T4 at batch 64 (about 53 GiB) but does with the fixes the estimator proposes, and
# fits an 80 GB H100 as it is. (GPU profiles: their memory does not depend on the machine running the tests.)
FIXABLE = {
    "model": {
        "vocab_size": 32000, "num_layers": 8, "hidden_size": 512, "num_heads": 8, "max_seq_len": 1024,
        "moe": {"num_routed_experts": 16, "num_shared_experts": 1, "top_k": 2, "expert_hidden_size": 1024},
    },
    "training": {"batch_size": 64, "max_steps": 200},
    "data": {"seq_len": 1024},
}  # fmt: skip


def _launch(client: Any, dataset: Dataset, spec: dict[str, Any]) -> Any:
    return client.post(
        "/api/jobs",
        {"name": "big", "spec": spec, "dataset": dataset.pk, "queue": "gpu"},
        content_type="application/json",
    )


@pytest.fixture
def text(alice: Any) -> Dataset:
    return Dataset.objects.create(owner=alice, name="t", format="txt", file_name="datasets/x/t.txt", state="ready")


@pytest.mark.django_db
def test_a_spec_that_cannot_fit_its_queue_is_refused_with_the_estimate_and_the_fix(
    alice: Any, text: Dataset, settings: Any
) -> None:
    client = signed_in(alice)
    settings.QUEUE_HARDWARE = {"gpu": "t4", "cpu": "cpu"}
    response = _launch(client, text, HUGE)
    assert response.status_code == 422  # a well-formed spec its hardware cannot hold: a rule, not a malformed request
    (message,) = response.json()["spec"]
    assert "gpu class's hardware" in message and "Will not fit" in message and "GiB needed" in message
    assert "smaller model" in message  # no setting makes it fit one device: the fix is a smaller model
    response = _launch(client, text, FIXABLE)
    assert response.status_code == 422
    (message,) = response.json()["spec"]
    assert "Fix: training.gradient_checkpointing = True" in message and "GiB" in message  # the change, its peak
    assert Job.objects.count() == 0  # nothing was recorded, nothing dispatched
    # The same spec fits a larger device: the queue's hardware decides.
    settings.QUEUE_HARDWARE = {"gpu": "h100-80gb", "cpu": "cpu"}
    assert _launch(client, text, FIXABLE).status_code == 201
    assert _launch(client, text, tiny_spec(20)).status_code == 201
