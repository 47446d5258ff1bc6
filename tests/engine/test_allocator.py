"""keep_freed_memory: inside the block, steps reuse the freed pages of the steps before; after it, the
kept memory goes back to the kernel and glibc's defaults are back.

The page-fault figures are measured in a fresh interpreter: how glibc's first fit places blocks depends on
every earlier allocation of the process, so in the test process they would depend on the tests before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from workers.engine import allocator
from workers.engine.allocator import keep_freed_memory

pytestmark = pytest.mark.skipif(
    allocator._glibc() is None, reason="mallopt exists only in glibc (Linux); elsewhere the block is a no-op"
)

MIB = 2**20
# One "training step": buffers of a few sizes, most above glibc's largest mmap threshold (32 MiB) like the
# expert-weight gradients of a 64-expert layer, allocated, touched and freed together.
STEP_MIB = (96, 40, 64, 8)

_PROBE = """
import json, resource, sys
import psutil, torch
from workers.engine.allocator import keep_freed_memory

STEP_MIB = json.loads(sys.argv[1])

def steps(n):
    faults = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [torch.ones(m * 2**20 // 4) for m in STEP_MIB]
        del buffers
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults

def freed_by_del(mib):  # RSS that deleting a fresh block larger than any freed one gives back at once
    t = torch.ones(mib * 2**20 // 4)
    held = psutil.Process().memory_info().rss
    del t
    return held - psutil.Process().memory_info().rss

out = {"before": steps(4)}
with keep_freed_memory() as applied:
    out["applied"] = applied
    out["inside"] = steps(12)
    out["freed_by_del_inside"] = freed_by_del(512)
    out["rss_inside"] = psutil.Process().memory_info().rss
out["rss_after"] = psutil.Process().memory_info().rss
out["freed_by_del_after"] = freed_by_del(1024)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(STEP_MIB)], capture_output=True, text=True, timeout=120, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _at_least_every_buffer_faulted(faults: list[int]) -> bool:
    # A fault maps at least a 4 KiB page, 2 MiB with transparent huge pages (THP "always", or torch's
    # THP_MEM_ALLOC_ENABLE): a step that faults its buffers in again takes at least one fault per 2 MiB.
    return min(faults) >= sum(STEP_MIB) // 2


def test_without_the_block_every_step_faults_its_buffers_in_again(probe: dict[str, Any]) -> None:
    assert _at_least_every_buffer_faulted(probe["before"]), probe["before"]


def test_inside_the_block_steps_reuse_the_pages_of_the_steps_before(probe: dict[str, Any]) -> None:
    assert probe["applied"]
    # The first steps grow the heap until glibc's first fit finds a coalesced run of freed blocks for each
    # request (measured: 2 or 5 steps, depending on where earlier blocks landed); after that, a step faults
    # in nothing (measured: 0) where it faulted in all its buffers before. Under 1% of what the later steps
    # allocate (counting pages as 4 KiB is an upper bound).
    later = probe["inside"][6:]
    assert sum(later) * 4096 < 0.01 * len(later) * sum(STEP_MIB) * MIB, probe["inside"]


def test_inside_the_block_a_freed_block_stays_mapped(probe: dict[str, Any]) -> None:
    assert probe["freed_by_del_inside"] < 16 * MIB, probe["freed_by_del_inside"]


def test_leaving_the_block_returns_the_kept_memory_and_restores_the_defaults(probe: dict[str, Any]) -> None:
    # malloc_trim(0) gave the free pages back (512 MiB and more were free in the heap) ...
    assert probe["rss_inside"] - probe["rss_after"] > 256 * MIB, (probe["rss_inside"], probe["rss_after"])
    # ... and a block larger than any free one is unmapped again as soon as it is freed.
    assert probe["freed_by_del_after"] > 1000 * MIB, probe["freed_by_del_after"]


def test_blocks_nest_and_the_outermost_restores() -> None:
    with keep_freed_memory() as outer:
        with keep_freed_memory() as inner:
            assert outer and inner
            assert allocator._depth == 2
        assert allocator._depth == 1
    assert allocator._depth == 0


def test_it_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_KEEP_FREED_MEMORY", "0")
    with keep_freed_memory() as applied:
        assert not applied
        assert allocator._depth == 0
