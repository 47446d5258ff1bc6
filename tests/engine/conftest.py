"""Fixtures shared by the engine tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.engine.tiny import tiny_spec, write_letters_corpus
from workers.engine.data import PreparedData, prepare


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a shared 2-core machine two threads were measured ~6x slower
    (they spin waiting for each other). Restored afterwards for other test modules. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 200-document letter corpus (``tests.engine.tiny.write_letters_corpus``), written once per module."""
    return write_letters_corpus(tmp_path_factory.mktemp("corpus") / "letters.jsonl")


@pytest.fixture(scope="module")
def prepared(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """``corpus`` prepared for the tiny spec (``tests.engine.tiny.TINY``: its tokenizer, seq_len and seeded
    validation split), once per module. A module whose runs use another seed or data prepares its own."""
    return prepare(tiny_spec(), corpus, tmp_path_factory.mktemp("prepared"))
