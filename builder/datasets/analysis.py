"""Statistics of a dataset, computed in one streaming pass that is also its validation.

Pure Python (no Django): it reads local files through the engine's readers (``workers.engine.data``), so the web
validates exactly what the trainer will read, and every problem is the readers' ``DataFormatError`` with its line.
Memory grows with the number of examples (a 4-byte length and an 8-byte hash each), never with the file size, and
never with the length of a line: a source's ``max_example_bytes`` refuses a longer example, by line, after reading
no more of it than the limit.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.engine.data import Format, Record, iter_records

# The readers take a label field name; a dataset without labels passes one that no JSON object or CSV header
# will have in practice, so no column is ever read (or type-checked) as a label.
NO_LABEL_FIELD = "\x00no label\x00"
SAMPLE_ROWS = 10
SAMPLE_TEXT_CHARS = 600
MAX_DISTINCT_LABELS = 1000  # beyond this the rest are counted together (a free-text column is not a label)
STATS_VERSION = 1

ProgressCallback = Callable[[float], None]


@dataclass(frozen=True)
class Source:
    """One local file of a dataset, read with these fields. ``split`` names the part of a split version."""

    path: Path
    format: Format
    text_field: str = "text"
    label_field: str = ""  # empty: no labels
    split: str | None = None
    max_example_bytes: int | None = None  # the web's DATASET_MAX_EXAMPLE_BYTES; None: no limit

    def records(self) -> Iterator[Record]:
        return iter_records(
            self.path,
            self.format,
            self.text_field,
            self.label_field or NO_LABEL_FIELD,
            max_example_bytes=self.max_example_bytes,
        )


def scan_file(path: Path) -> tuple[int, str]:
    """``(number of lines, sha256 hex)`` in one fast binary pass (lines drive the progress of the slow pass)."""
    digest = hashlib.sha256()
    lines = 0
    last = b""
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            lines += chunk.count(b"\n")
            last = chunk
    if last and not last.endswith(b"\n"):
        lines += 1  # a last line without a terminator is still a line
    return lines, digest.hexdigest()


class Progress:
    """Maps record line numbers of several files onto 0..1, calling ``callback`` at most every ``interval`` s."""

    def __init__(self, line_counts: Sequence[int], callback: ProgressCallback | None, interval: float = 0.5) -> None:
        self.total = max(1, sum(line_counts))
        self.offsets = [sum(line_counts[:i]) for i in range(len(line_counts))]
        self.callback = callback
        self.interval = interval
        self._last = 0.0

    def at(self, source_index: int, line: int) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.callback(min(1.0, (self.offsets[source_index] + line) / self.total))


def length_histogram(lengths: Sequence[int]) -> list[dict[str, Any]]:
    """Counts of lengths in power-of-two bins ``[0], [1], [2, 3], [4, 7], ...`` (readable on any scale).

    Leading and trailing empty bins are dropped; the counts sum to ``len(lengths)``.
    """
    if not lengths:
        return []
    top = max(lengths)
    bins: list[dict[str, Any]] = [{"low": 0, "high": 0, "count": 0}]
    low = 1
    while low <= top:
        bins.append({"low": low, "high": 2 * low - 1, "count": 0})
        low *= 2
    for n in lengths:
        bins[0 if n == 0 else n.bit_length()]["count"] += 1
    first = next(i for i, b in enumerate(bins) if b["count"])
    last = max(i for i, b in enumerate(bins) if b["count"])
    return bins[first : last + 1]


def percentiles(lengths: Sequence[int]) -> dict[str, float]:
    """min, p50, p90, p99, max (nearest rank) and mean of ``lengths`` (zeros when empty)."""
    if not lengths:
        return {"min": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    ordered = sorted(lengths)

    def rank(q: float) -> int:
        return int(ordered[max(0, math.ceil(q * len(ordered)) - 1)])

    return {
        "min": ordered[0],
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 2),
    }


def text_digest(text: str) -> int:
    """A 64-bit hash of the exact text: equal texts collide always, different ones with probability ~2⁻⁶⁴."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def analyze(sources: Sequence[Source], progress: ProgressCallback | None = None, seed: int = 0) -> dict[str, Any]:
    """Validate and describe ``sources`` (read in order); raises ``DataFormatError`` at the first bad record.

    Returns a JSON-able dict: ``examples``, ``characters``, ``words`` (whitespace-separated), ``tokens`` (under the
    engine's byte tokenizer: one per UTF-8 byte), ``empty`` (whitespace-only texts), ``lengths`` (percentiles of
    characters per example), ``histogram`` (power-of-two bins of characters per example), ``labels`` (counts per
    label, or None without a label field), ``duplicates`` (exact repeats of an earlier text) and
    ``duplicate_rate``, ``splits`` (examples per split), ``samples`` (up to ``SAMPLE_ROWS`` rows chosen uniformly
    with ``seed``) and ``files`` (lines and sha256 of each source).
    """
    scans = [scan_file(s.path) for s in sources]
    meter = Progress([lines for lines, _ in scans], progress)
    lengths: array[int] = array("I")
    # 8 bytes per example; duplicates are counted once at the end (a set would cost ~10x more per example).
    digests: array[int] = array("Q")
    examples = characters = words = tokens = empty = labelled = 0
    label_counts: dict[str, int] = {}
    label_kind: str | None = None
    other_labels = 0
    splits: dict[str, int] = {}
    rng = random.Random(seed)
    samples: list[dict[str, Any]] = []
    has_labels = any(s.label_field for s in sources)

    for index, source in enumerate(sources):
        for record in source.records():
            text = record.text
            n_chars = len(text)
            lengths.append(n_chars)
            characters += n_chars
            words += len(text.split())
            tokens += len(text.encode("utf-8"))
            if not text.strip():
                empty += 1
            digests.append(text_digest(text))
            if record.label is not None:
                labelled += 1
                label_kind = "integer" if isinstance(record.label, int) else "string"
                key = str(record.label)
                if key in label_counts or len(label_counts) < MAX_DISTINCT_LABELS:
                    label_counts[key] = label_counts.get(key, 0) + 1
                else:
                    other_labels += 1
            if source.split:
                splits[source.split] = splits.get(source.split, 0) + 1
            # Reservoir sampling: every example has the same chance to be shown, whatever the file size.
            row = {
                "line": record.line,
                "split": source.split,
                "text": text[:SAMPLE_TEXT_CHARS],
                "truncated": n_chars > SAMPLE_TEXT_CHARS,
                "label": record.label,
                "chars": n_chars,
            }
            if len(samples) < SAMPLE_ROWS:
                samples.append(row)
            else:
                slot = rng.randrange(examples + 1)
                if slot < SAMPLE_ROWS:
                    samples[slot] = row
            examples += 1
            meter.at(index, record.line)

    duplicates = examples - int(np.unique(np.frombuffer(digests, dtype=np.uint64)).size) if examples else 0
    ordered_labels = sorted(label_counts.items(), key=lambda item: (-item[1], item[0]))
    return {
        "version": STATS_VERSION,
        "examples": examples,
        "characters": characters,
        "words": words,
        "tokens": tokens,
        "tokenizer": "bytes",
        "empty": empty,
        "lengths": percentiles(lengths),
        "histogram": length_histogram(lengths),
        "labels": (
            {
                "field": next(s.label_field for s in sources if s.label_field),
                "type": label_kind,
                "labelled": labelled,
                "unlabelled": examples - labelled,
                "distinct": len(label_counts) + (1 if other_labels else 0),
                "counts": [{"label": label, "count": count} for label, count in ordered_labels],
                "other": other_labels,
            }
            if has_labels
            else None
        ),
        "duplicates": duplicates,
        "duplicate_rate": round(duplicates / examples, 6) if examples else 0.0,
        "splits": splits or None,
        "samples": sorted(samples, key=lambda r: (r["split"] or "", r["line"])),
        "files": [
            {"split": s.split, "lines": lines, "sha256": sha} for s, (lines, sha) in zip(sources, scans, strict=True)
        ],
    }
