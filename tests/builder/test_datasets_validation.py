"""Each kind of malformed file gives its precise error (line and reason); statistics are exact on a known file.

The validation is the engine's readers, reached the way the worker reaches them: ``analyze`` on local files, and
``processing.analyze_dataset`` on a dataset row whose file is in storage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from builder.datasets import processing, storage
from builder.datasets.analysis import Source, analyze, length_histogram, percentiles
from builder.datasets.models import Dataset, DatasetState
from workers.engine.data import DataFormatError

MALFORMED: list[tuple[str, str, bytes, dict[str, str], int | None, str]] = [
    # (case, format, content, fields, expected line, expected message)
    (
        "bad JSON",
        "jsonl",
        b'{"text": "one"}\n{"text": "two"}\n{"text": "three"\n',
        {},
        3,
        "invalid JSON: Expecting ',' delimiter (column 17)",
    ),
    (
        "missing text field",
        "jsonl",
        b'{"text": "one"}\n{"body": "two", "id": 2}\n',
        {},
        2,
        "missing field 'text' (fields: body, id)",
    ),
    (
        "invalid UTF-8",
        "jsonl",
        b'{"text": "one"}\n{"text": "caf\xe9"}\n',
        {},
        2,
        "invalid UTF-8 (byte 0xe9 at column 14)",
    ),
    ("empty file", "jsonl", b"", {}, None, "empty file: no records found"),
    ("only blank lines", "jsonl", b"\n  \n\n", {}, None, "empty file: no records found"),
    ("empty TXT", "txt", b"\n\n", {}, None, "empty file: no records found"),
    (
        "mixed label types",
        "jsonl",
        b'{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": "spam"}\n',
        {"label_field": "label"},
        3,
        "mixed label types: this label is a string, the label on line 1 is a integer",
    ),
    (
        "text is not a string",
        "jsonl",
        b'{"text": "a"}\n{"text": 42}\n',
        {},
        2,
        "field 'text' must be a string, found number",
    ),
    (
        "a JSON array",
        "jsonl",
        b'[\n  {"text": "a"},\n  {"text": "b"}\n]\n',
        {},
        1,
        "a JSON array is not JSON Lines: one object per line",
    ),
    ("an array on one line", "jsonl", b'[{"text": "a"}]\n', {}, 1, "expected a JSON object, found array"),
    ("not an object", "jsonl", b'{"text": "a"}\n"just text"\n', {}, 2, "expected a JSON object, found string"),
    (
        "CSV without the text column",
        "csv",
        b"body,label\nhello,1\n",
        {"label_field": "label"},
        1,
        "text column 'text' is not in the header ['body', 'label']",
    ),
    (
        "CSV row with too many fields",
        "csv",
        b'text,label\nhello,1\n"a, b",2\nc,3,extra\n',
        {"label_field": "label"},
        4,
        "expected 2 fields (the header's), found 3",
    ),
    (
        "CSV with a chosen column that is missing",
        "csv",
        b"text,label\nhello,1\n",
        {"text_field": "review"},
        1,
        "text column 'review' is not in the header ['text', 'label']",
    ),
]


@pytest.mark.parametrize(
    ("case", "fmt", "content", "fields", "line", "message"), MALFORMED, ids=[case for case, *_ in MALFORMED]
)
def test_each_malformed_file_gives_its_precise_error(
    tmp_path: Path, case: str, fmt: str, content: bytes, fields: dict[str, str], line: int | None, message: str
) -> None:
    path = tmp_path / f"data.{fmt}"
    path.write_bytes(content)
    source = Source(path, fmt, fields.get("text_field", "text"), fields.get("label_field", ""))  # type: ignore[arg-type]
    with pytest.raises(DataFormatError) as raised:
        analyze([source])
    assert (raised.value.line, raised.value.message) == (line, message)


def test_without_a_label_field_no_column_is_read_as_a_label(tmp_path: Path) -> None:
    """A file whose 'label' values mix types is fine when the person said it has no labels."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n')
    stats = analyze([Source(path, "jsonl")])
    assert stats["examples"] == 2 and stats["labels"] is None


def test_statistics_are_exact(tmp_path: Path) -> None:
    rows = [
        {"text": "hello world", "label": "greeting"},
        {"text": "hello world", "label": "greeting"},
        {"text": "   ", "label": "blank"},
        {"text": "ab", "label": "short"},
        {"text": "αβγ δ", "label": "greek"},
        {"text": "line one\nline two", "label": "greeting"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    progress: list[float] = []
    stats = analyze([Source(path, "jsonl", "text", "label")], progress=progress.append)

    assert stats["examples"] == 6
    assert stats["characters"] == 11 + 11 + 3 + 2 + 5 + 17
    assert stats["words"] == 2 + 2 + 0 + 1 + 2 + 4
    assert stats["tokens"] == 11 + 11 + 3 + 2 + (3 * 2 + 1 + 2) + 17  # UTF-8 bytes: α, β, γ, δ are 2 bytes each
    assert stats["empty"] == 1
    assert stats["duplicates"] == 1 and stats["duplicate_rate"] == round(1 / 6, 6)
    assert stats["lengths"] == {"min": 2, "p50": 5, "p90": 17, "p99": 17, "max": 17, "mean": round(49 / 6, 2)}
    # Power-of-two bins: [2, 3] holds 2 and 3; [4, 7] holds 5; [8, 15] holds 11, 11; [16, 31] holds 17.
    assert [(b["low"], b["high"], b["count"]) for b in stats["histogram"]] == [
        (2, 3, 2),
        (4, 7, 1),
        (8, 15, 2),
        (16, 31, 1),
    ]
    labels = stats["labels"]
    assert labels["type"] == "string" and labels["labelled"] == 6 and labels["distinct"] == 4
    assert labels["counts"] == [
        {"label": "greeting", "count": 3},
        {"label": "blank", "count": 1},
        {"label": "greek", "count": 1},
        {"label": "short", "count": 1},
    ]
    assert [s["line"] for s in stats["samples"]] == [1, 2, 3, 4, 5, 6]  # fewer rows than the sample: all of them
    assert stats["files"][0]["lines"] == 6 and len(stats["files"][0]["sha256"]) == 64
    assert all(0 <= p <= 1 for p in progress)


def test_sample_rows_are_a_seeded_uniform_choice(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("\n\n".join(f"document {i}" for i in range(500)) + "\n")
    first = analyze([Source(path, "txt")], seed=3)["samples"]
    again = analyze([Source(path, "txt")], seed=3)["samples"]
    other = analyze([Source(path, "txt")], seed=4)["samples"]
    assert len(first) == 10 and first == again and first != other
    assert {s["text"] for s in first} <= {f"document {i}" for i in range(500)}


def test_histogram_and_percentiles_of_edge_cases() -> None:
    assert length_histogram([]) == []
    assert length_histogram([0, 0, 1]) == [{"low": 0, "high": 0, "count": 2}, {"low": 1, "high": 1, "count": 1}]
    assert sum(b["count"] for b in length_histogram(list(range(1000)))) == 1000
    assert percentiles([]) == {"min": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}


def _stored_dataset(tmp_path: Path, owner: Any, content: bytes, fmt: str = "jsonl", **fields: Any) -> Dataset:
    path = tmp_path / f"upload.{fmt}"
    path.write_bytes(content)
    name = storage.save_local_file(f"datasets/test/{tmp_path.name}/upload.{fmt}", path)
    return Dataset.objects.create(
        owner=owner,
        name="t",
        format=fmt,
        file_name=name,
        size_bytes=len(content),
        original_filename=path.name,
        **fields,
    )


@pytest.mark.django_db
def test_the_worker_records_the_line_and_the_reason(media_root: Path, tmp_path: Path, alice: Any) -> None:
    dataset = _stored_dataset(tmp_path, alice, b'{"text": "ok"}\n{"text": "ok"}\n{"txt": "typo"}\n')
    outcome = processing.analyze_dataset(dataset.pk)
    dataset.refresh_from_db()
    assert outcome["outcome"] == "invalid"
    assert dataset.state == DatasetState.INVALID
    assert (dataset.error_line, dataset.error_message) == (3, "missing field 'text' (fields: txt)")
    assert str(tmp_path) not in dataset.error_message  # never a path of the worker's machine


@pytest.mark.django_db
def test_the_worker_marks_a_valid_file_ready(media_root: Path, tmp_path: Path, alice: Any) -> None:
    content = b'text,topic\nfirst row,a\n"second, quoted\nover two lines",b\nthird,a\n'
    dataset = _stored_dataset(tmp_path, alice, content, "csv", label_field="topic")
    assert processing.analyze_dataset(dataset.pk)["outcome"] == "ready"
    dataset.refresh_from_db()
    assert dataset.state == DatasetState.READY and dataset.progress == 1.0
    assert dataset.stats["examples"] == 3
    assert dataset.stats["labels"]["counts"] == [{"label": "a", "count": 2}, {"label": "b", "count": 1}]
    assert [s["line"] for s in dataset.stats["samples"]] == [2, 3, 5]  # the quoted record starts on line 3
    assert dataset.sha256 == dataset.stats["files"][0]["sha256"]
