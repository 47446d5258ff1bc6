"""Fixtures for the benchmark smoke tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def environment_restored() -> Iterator[None]:
    """A benchmark's ``main`` sets process-wide variables for its run (``THP_MEM_ALLOC_ENABLE``: torch then aligns
    large allocations to huge pages); later tests must not inherit them. A memory test that measured a fresh
    subprocess's peak RSS found 832 MiB instead of ~700 after ``bench.precision`` had set it in the suite's process.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def torch_threads_restored() -> Iterator[None]:
    """The bench sets torch's thread count for its process; tests that run after it keep theirs."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)
