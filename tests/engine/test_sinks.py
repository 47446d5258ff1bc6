"""Tests of workers/engine/sinks.py: the protocol, JSONL records, TensorBoard purge on replay, fan-out."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from workers.engine.sinks import (
    FanoutSink,
    JsonlSink,
    MemorySink,
    MetricsSink,
    TensorBoardSink,
    jsonable,
    latest_points,
    read_jsonl,
)


def read_tensorboard(logdir: Path) -> EventAccumulator:
    # size_guidance 0 = keep every point (the default keeps a sample, which would hide duplicates).
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_every_sink_satisfies_the_protocol(tmp_path: Path) -> None:
    sinks: list[MetricsSink] = [MemorySink(), JsonlSink(tmp_path / "m.jsonl"), TensorBoardSink(tmp_path / "tb")]
    for sink in [*sinks, FanoutSink(*sinks)]:
        assert isinstance(sink, MetricsSink)
    for sink in sinks:
        sink.close()


def test_memory_sink_keeps_order() -> None:
    sink = MemorySink()
    sink.emit(1, {"loss": 2.0})
    sink.event("checkpoint", {"step": 1})
    sink.emit(2, {"loss": 1.5, "lr": 0.1})
    sink.close()
    assert sink.series("loss") == [(1, 2.0), (2, 1.5)]
    assert sink.series("lr") == [(2, 0.1)]
    assert sink.events_of("checkpoint") == [{"step": 1}]
    assert sink.closed


def test_jsonable_replaces_non_finite_floats() -> None:
    value = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": {"d": (2, "x")}}
    assert jsonable(value) == {"a": "nan", "b": ["inf", "-inf", 1.5], "c": {"d": [2, "x"]}}


def test_jsonl_sink_writes_strict_json_lines_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.emit(1, {"loss": 3.0})
    sink.event("anomaly", {"step": 2, "loss": math.nan})
    # Flushed per record: a live reader sees both lines before close.
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    sink.close()
    again = JsonlSink(path)  # a resumed run appends to the same history
    again.emit(2, {"loss": 2.5})
    again.close()
    records = read_jsonl(path)
    assert [r["type"] for r in records] == ["metrics", "event", "metrics"]
    assert records[1]["kind"] == "anomaly" and records[1]["step"] == 2 and records[1]["data"]["loss"] == "nan"


def test_read_jsonl_skips_a_torn_last_line_and_replays_replace(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    sink = JsonlSink(path)
    for step in (1, 2, 3):
        sink.emit(step, {"loss": float(step)})
    sink.event("rollback", {"step": 1})
    sink.emit(2, {"loss": 20.0})
    sink.close()
    with open(path, "a") as f:
        f.write('{"type": "metrics", "step": 3, "metr')  # killed mid-write
    points = latest_points(read_jsonl(path))
    assert points == {1: {"loss": 1.0}, 2: {"loss": 20.0}, 3: {"loss": 3.0}}
    resumed = JsonlSink(path)  # the next writer must not glue its first record onto the fragment
    resumed.emit(4, {"loss": 4.0})
    resumed.close()
    assert latest_points(read_jsonl(path))[4] == {"loss": 4.0}


def test_tensorboard_sink_one_point_per_step_after_rollback_and_resume(tmp_path: Path) -> None:
    logdir = tmp_path / "tb"
    first = TensorBoardSink(logdir)
    for step in range(1, 14):  # a run that got to step 13 ...
        first.emit(step, {"loss": float(step), "lr": 0.1})
    first.event("rollback", {"step": 5})  # ... rolled back to its step-5 checkpoint ...
    for step in range(6, 10):
        first.emit(step, {"loss": 100.0 + step, "lr": 0.1})
    first.close()  # ... and was killed after step 9, its last checkpoint at step 8.
    resumed = TensorBoardSink(logdir, purge_step=9)
    for step in range(9, 16):
        resumed.emit(step, {"loss": 1000.0 + step, "lr": 0.1})
    resumed.event("checkpoint", {"step": 15, "path": "x", "nan": math.nan})
    resumed.close()

    tb = read_tensorboard(logdir)
    for tag in ("loss", "lr"):
        steps = [e.step for e in tb.Scalars(tag)]
        assert steps == list(range(1, 16)), tag  # exactly one point per (tag, step)
    values = {e.step: e.value for e in tb.Scalars("loss")}
    assert values[5] == 5.0 and values[6] == 106.0 and values[9] == 1009.0 and values[15] == 1015.0
    assert "events/checkpoint/text_summary" in tb.Tags()["tensors"]
    assert "events/rollback/text_summary" in tb.Tags()["tensors"]


class Exploding:
    def __init__(self) -> None:
        self.calls = 0

    def emit(self, step: int, metrics: Mapping[str, float]) -> None:
        self.calls += 1
        raise OSError("database is down")

    def event(self, kind: str, data: Mapping[str, Any]) -> None:
        self.calls += 1

    def flush(self) -> None:
        self.calls += 1

    def close(self) -> None:
        self.calls += 1
        raise OSError("close failed")


def test_fanout_reaches_every_sink_then_raises_the_first_error() -> None:
    before, after = MemorySink(), MemorySink()
    broken = Exploding()
    fan = FanoutSink(before, broken, after)
    with pytest.raises(OSError, match="database is down"):
        fan.emit(1, {"loss": 1.0})
    fan.event("checkpoint", {"step": 1})
    with pytest.raises(OSError, match="close failed"):
        fan.close()
    assert before.points == after.points == [(1, {"loss": 1.0})]
    assert before.events == after.events == [("checkpoint", {"step": 1})]
    assert before.closed and after.closed and broken.calls == 3
