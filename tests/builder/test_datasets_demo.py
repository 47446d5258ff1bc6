"""The built-in demo datasets: made from Python's own documentation with no network, idempotently, and usable
by the engine's data preparation as they are."""

from __future__ import annotations

import io
import json
import pydoc_data.topics
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client

from builder.datasets import demo, storage
from builder.datasets.models import Dataset, DatasetState, Origin
from workers.engine.data import prepare
from workers.engine.spec import Spec


def _tiny_spec(**model: Any) -> Spec:
    return Spec.model_validate(
        {
            "model": {"vocab_size": 259, "hidden_size": 32, "num_layers": 1, "num_heads": 2, **model},
            "data": {"tokenizer": "bytes", "seq_len": 64, "val_fraction": 0.1},
        }
    )


@pytest.mark.django_db
def test_builtin_datasets_are_made_once_and_prepare_for_training(
    media_root: Path, tmp_path: Path, alice: Any, charlie: Any
) -> None:
    out = io.StringIO()
    call_command("ensure_demo_datasets", stdout=out)
    corpus = Dataset.objects.get(slug=demo.CORPUS_SLUG)
    families = Dataset.objects.get(slug=demo.FAMILIES_SLUG)
    for dataset in (corpus, families):
        assert dataset.origin == Origin.BUILTIN and dataset.owner is None
        assert dataset.state == DatasetState.READY and storage.default_storage.exists(dataset.file_name)

    # The corpus holds every help topic verbatim, then docstrings, each naming its source.
    with storage.local_copy(corpus.file_name) as path:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    topics = pydoc_data.topics.topics
    assert [r["text"] for r in rows[: len(topics)]] == [topics[k].strip() for k in sorted(topics)]
    assert any(r["source"] == "json:loads" for r in rows)
    assert corpus.stats["examples"] == len(rows) and corpus.stats["duplicates"] > 0
    assert "pydoc_data.topics" in corpus.description and demo.python_version() in corpus.description

    labels = {item["label"] for item in families.stats["labels"]["counts"]}
    assert labels == set(demo.FAMILIES)
    assert families.stats["duplicates"] == 0 and min(i["count"] for i in families.stats["labels"]["counts"]) >= 100

    # A second run changes nothing.
    before = {d.pk: (d.file_name, d.updated_at) for d in Dataset.objects.filter(origin=Origin.BUILTIN)}
    out = io.StringIO()
    call_command("ensure_demo_datasets", stdout=out)
    assert out.getvalue() == ""
    assert {d.pk: (d.file_name, d.updated_at) for d in Dataset.objects.filter(origin=Origin.BUILTIN)} == before

    # Both feed the engine's preparation as they are: causal LM on the corpus, 8-way classification on families.
    with storage.local_copy(corpus.file_name) as path:
        lm = prepare(_tiny_spec(), path, tmp_path / "lm")
    assert lm.task == "causal_lm" and lm.meta["splits"]["train"]["documents"] > 6000
    with storage.local_copy(families.file_name) as path:
        cls = prepare(_tiny_spec(task="classification", num_labels=len(demo.FAMILIES)), path, tmp_path / "cls")
    assert cls.labels == sorted(demo.FAMILIES)

    # Built-in datasets are everyone's to see and no one's to delete.
    client = Client()
    for user in (alice, charlie):
        client.force_login(user)
        listed = {d["slug"] for d in client.get("/api/datasets").json()}
        assert {demo.CORPUS_SLUG, demo.FAMILIES_SLUG} <= listed
        page = client.get(f"/datasets/{families.pk}/")
        assert page.status_code == 200 and b"label-chart" in page.content
        assert client.delete(f"/api/datasets/{families.pk}").status_code == 403
    assert Dataset.objects.filter(pk=families.pk).exists()
