"""Datasets: streaming readers, tokenizers, preparation into memory-mapped token files, deterministic batching.

Readers (public API, also used by the web's upload validation):

- ``detect_format(path)`` -> ``"jsonl" | "txt" | "csv"``.
- ``iter_records(path, fmt=None, text_field="text", label_field="label", require_label=False)`` streams
  ``Record(text, label, line)``; every problem is a ``DataFormatError(path, line, message)`` with the 1-based
  line where the offending record starts (``line=None`` for file-level problems such as an empty file).
- ``summarize(...)`` reads a whole file once and returns counts and the label vocabulary.

Formats:

- **JSONL** (``.jsonl``, ``.ndjson``, ``.json``): one JSON object per line, the text under ``text_field`` and,
  optionally, the label (a string or an integer) under ``label_field``. Blank lines are skipped.
- **TXT** (``.txt``, ``.text``): one document per *paragraph*: documents are separated by one or more blank
  (whitespace-only) lines; the lines of a paragraph are joined with ``"\\n"``. Paragraphs rather than lines
  because prose, poems and code keep their line breaks inside a document (a line-per-document file would
  cut every one of them apart). A file without any blank line is one document, which ``prepare`` refuses
  (it needs two to hold one out) with a message saying to separate documents by blank lines.
  TXT carries no labels.
- **CSV** (``.csv``): a header row, then one record per row; ``text_field``/``label_field`` name columns.
  Quoted fields may span lines (the record's line is where it starts). Labels are strings.

All files must be UTF-8 (a leading byte-order mark is accepted). Readers hold one line (one CSV record,
one TXT paragraph) at a time, so a 2 GB upload is never held whole. With ``max_example_bytes`` (the readers'
parameter; the web passes its ``DATASET_MAX_EXAMPLE_BYTES``) they also never hold more than that many bytes of one
example: a longer JSONL line, CSV record or TXT paragraph is refused with the line where it starts, after reading at
most the limit (plus a line terminator) of it, so memory stays bounded even by a file that is one 2 GB line.

Tokenizers (both are standard ``tokenizer.json`` files loadable with ``tokenizers.Tokenizer.from_file``):

- ``bytes``: ids 0..255 are the bytes of the UTF-8 text, then ``BYTE_SPECIAL_TOKENS`` (``<pad>`` 256,
  ``<bos>`` 257, ``<eos>`` 258). Built as a merge-free byte-level BPE, so it is the same kind of artifact.
- ``bpe``: byte-level BPE trained on the training split with ``data.bpe_vocab_size`` (or
  ``model.vocab_size``); the special tokens take ids 0, 1, 2.

Text is always encoded with ``encode_special_tokens=True``: a literal ``"<eos>"`` inside a document is
text, never a control token. ``tokenizers`` does not store that flag in ``tokenizer.json``, so load
tokenizers with ``load_tokenizer`` (or set the flag yourself).

Preparation (``prepare(spec, source, work_dir)``) writes into ``work_dir``::

    tokenizer.json
    train.bin, val.bin        token ids (uint16 when the vocabulary fits, else uint32), memory-mapped
    train.idx, val.idx        classification only: int64 offsets (n + 1) of each example in ``*.bin``
    train.labels, val.labels  classification only: int64 label ids
    labels.json               classification only: label id -> label value
    meta.json                 what was prepared, from what, with which settings
    COMPLETE                  the marker, written last; its content is the preparation's fingerprint

For ``causal_lm`` the split's documents are concatenated, each followed by ``<eos>``.

Batching (``Batches``): causal_lm cuts the token stream into consecutive windows of ``seq_len`` tokens
(the last, partial window is padded with ``<pad>`` and label -100); labels equal the inputs (the model
shifts). Each epoch visits every window exactly once in a permutation seeded by ``(seed, epoch)``.
Classification yields one example per row: at most ``seq_len - 1`` tokens then ``<eos>``, padded on the
right, with ``attention_mask`` 1 for real tokens.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from workers.engine.spec import BYTE_SPECIAL_TOKENS, Spec

Format = Literal["jsonl", "txt", "csv"]
Label = int | str

FORMATS: tuple[Format, ...] = ("jsonl", "txt", "csv")
_EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".txt": "txt",
    ".text": "txt",
    ".csv": "csv",
}
IGNORE_INDEX = -100  # labels the loss skips (the model's contract)
PREP_FORMAT_VERSION = 1  # bump when the files written by ``prepare`` change meaning
_MARKER = "COMPLETE"
_ENCODE_CHUNK = 1024  # documents per ``encode_batch`` call: large enough to use the Rust threads


class DataFormatError(ValueError):
    """A data file that cannot be used, with the 1-based line where the problem is (None: the whole file)."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class Record:
    """One document: its text, its label (None when the file has none) and the line where it starts."""

    text: str
    label: Label | None
    line: int


# --------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike[str]) -> Format:
    """The format of ``path`` from its extension; unknown extensions: JSONL if it starts with ``{``, else TXT."""
    suffix = Path(path).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return "jsonl" if head.startswith(b"{") else "txt"


def _too_long(limit: int, what: str = "the example on this line") -> str:
    return f"{what} is longer than {limit} bytes, the limit per example"


def _iter_lines(path: str | os.PathLike[str], max_line_bytes: int | None = None) -> Iterator[tuple[int, str, int]]:
    """``(line number, decoded line with its terminator, its size in bytes)``, one line in memory at a time.

    Decoding per line (rather than through a text wrapper) is what lets an invalid byte be reported with
    its line number. With ``max_line_bytes`` a longer line (terminator excluded) is a ``DataFormatError``, raised
    after reading no more of it than the limit and its terminator (``readline`` with a size: iterating a file
    reads a whole line, however long, into memory).
    """
    # Room for the limit and a "\r\n" terminator: a line that fills it without ending is over the limit.
    chunk = -1 if max_line_bytes is None else max_line_bytes + 2
    with open(path, "rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(chunk), b""), start=1):
            if max_line_bytes is not None and len(raw) - _terminator_length(raw) > max_line_bytes:
                raise DataFormatError(path, number, _too_long(max_line_bytes))
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark, written by some spreadsheet exports
            try:
                yield number, raw.decode("utf-8"), len(raw)
            except UnicodeDecodeError as exc:
                raise DataFormatError(
                    path, number, f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                ) from None


def _terminator_length(raw: bytes) -> int:
    return 2 if raw.endswith(b"\r\n") else 1 if raw.endswith((b"\n", b"\r")) else 0


def _strip_eol(line: str) -> str:
    return line.rstrip("\r\n")


class _LabelKinds:
    """Rejects a file whose labels mix JSON strings and integers (their ids would be ambiguous)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self.kind: str | None = None
        self.first_line = 0

    def check(self, label: Label, line: int) -> None:
        kind = "integer" if isinstance(label, int) else "string"
        if self.kind is None:
            self.kind, self.first_line = kind, line
        elif kind != self.kind:
            raise DataFormatError(
                self.path,
                line,
                f"mixed label types: this label is a {kind}, the label on line {self.first_line} is a {self.kind}",
            )


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _iter_jsonl(
    path: str | os.PathLike[str], text_field: str, label_field: str, require_label: bool, max_bytes: int | None
) -> Iterator[Record]:
    kinds = _LabelKinds(path)
    for number, raw, _ in _iter_lines(path, max_bytes):
        line = raw.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == 1 and line.startswith("["):
                raise DataFormatError(path, number, "a JSON array is not JSON Lines: one object per line") from None
            raise DataFormatError(path, number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:  # json recurses per nesting level: thousands of brackets exhaust the stack
            raise DataFormatError(path, number, "invalid JSON: nested too deeply") from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, number, f"expected a JSON object, found {_json_type(obj)}")
        if text_field not in obj:
            keys = ", ".join(sorted(obj)[:10]) or "none"
            raise DataFormatError(path, number, f"missing field {text_field!r} (fields: {keys})")
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataFormatError(path, number, f"field {text_field!r} must be a string, found {_json_type(text)}")
        label = obj.get(label_field)
        if label is None:
            if require_label:
                raise DataFormatError(path, number, f"missing label field {label_field!r}")
        elif isinstance(label, bool) or not isinstance(label, int | str):
            raise DataFormatError(
                path, number, f"label {label_field!r} must be a string or an integer, found {_json_type(label)}"
            )
        else:
            kinds.check(label, number)
        yield Record(text, label, number)


def _iter_txt(path: str | os.PathLike[str], max_bytes: int | None) -> Iterator[Record]:
    lines: list[str] = []
    start = size = 0
    for number, raw, size_of_line in _iter_lines(path, max_bytes):
        line = _strip_eol(raw)
        if line.strip():
            if not lines:
                start, size = number, 0
            lines.append(line)
            size += size_of_line
            if max_bytes is not None and size > max_bytes:
                raise DataFormatError(path, start, _too_long(max_bytes, "the document starting on this line"))
        elif lines:
            yield Record("\n".join(lines), None, start)
            lines = []
    if lines:
        yield Record("\n".join(lines), None, start)


def _iter_csv(
    path: str | os.PathLike[str], text_field: str, label_field: str, require_label: bool, max_bytes: int | None
) -> Iterator[Record]:
    # A long document is one long field; the default limit (128 KiB) would reject it. The limit is
    # process-global, and raising it cannot break another reader. max_bytes bounds a record instead (below).
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    record_bytes = 0  # bytes of the record being read: csv reads a record's lines one by one, never ahead

    def lines() -> Iterator[str]:
        nonlocal record_bytes
        for _, raw, size_of_line in _iter_lines(path, max_bytes):
            record_bytes += size_of_line
            if max_bytes is not None and record_bytes > max_bytes:
                raise DataFormatError(path, previous_end + 1, _too_long(max_bytes, "the record starting on this line"))
            yield raw

    reader = csv.reader(lines(), strict=True)
    header: list[str] | None = None
    text_col = label_col = -1
    previous_end = 0
    while True:
        record_bytes = 0
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataFormatError(path, previous_end + 1, f"malformed CSV: {exc}") from None
        start, previous_end = previous_end + 1, reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            if header.count(text_field) != 1:
                problem = "is not" if text_field not in header else "appears more than once"
                raise DataFormatError(path, start, f"text column {text_field!r} {problem} in the header {header}")
            text_col = header.index(text_field)
            if label_field in header:
                label_col = header.index(label_field)
            elif require_label:
                raise DataFormatError(path, start, f"label column {label_field!r} is not in the header {header}")
            continue
        if len(row) != len(header):
            raise DataFormatError(path, start, f"expected {len(header)} fields (the header's), found {len(row)}")
        label: str | None = row[label_col] if label_col >= 0 else None
        if label is not None and not label.strip():
            if require_label:
                raise DataFormatError(path, start, f"empty label in column {label_field!r}")
            label = None
        yield Record(row[text_col], label, start)


def iter_records(
    path: str | os.PathLike[str],
    fmt: Format | None = None,
    text_field: str = "text",
    label_field: str = "label",
    *,
    require_label: bool = False,
    max_example_bytes: int | None = None,
) -> Iterator[Record]:
    """Stream the documents of ``path``; raise ``DataFormatError`` at the first problem.

    ``fmt`` None: ``detect_format``. ``require_label``: every record must carry a label (classification).
    ``max_example_bytes``: a JSONL line, CSV record or TXT paragraph longer than this is refused with its line,
    having read no more of it than the limit (None: no limit, as before).
    A file without any record raises ``DataFormatError(path, None, "empty file ...")`` once the stream ends.
    """
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataFormatError(path, None, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    records: Iterator[Record]
    if fmt == "jsonl":
        records = _iter_jsonl(path, text_field, label_field, require_label, max_example_bytes)
    elif fmt == "csv":
        records = _iter_csv(path, text_field, label_field, require_label, max_example_bytes)
    else:
        if require_label:
            raise DataFormatError(path, None, "TXT files carry no labels: use JSONL or CSV for classification")
        records = _iter_txt(path, max_example_bytes)
    count = 0
    for record in records:
        count += 1
        yield record
    if count == 0:
        raise DataFormatError(path, None, "empty file: no records found")


def label_vocabulary(labels: Iterable[Label]) -> list[Label]:
    """Distinct labels in id order: integers (and all-integer strings) numerically, other strings sorted.

    So labels ``0..K-1`` keep their value as id, and CSV labels ``"2", "10"`` are not ordered as text.
    """
    distinct = set(labels)
    if all(isinstance(x, str) and re.fullmatch(r"-?\d+", x) for x in distinct):
        return sorted(distinct, key=lambda x: int(x))
    return sorted(distinct)  # one kind only: the readers reject files that mix strings and integers


@dataclass
class DatasetSummary:
    """What one full read of a data file found (the upload validator shows this)."""

    format: Format
    num_records: int
    num_chars: int
    num_bytes: int
    label_counts: dict[Label, int] = field(default_factory=dict)

    @property
    def labels(self) -> list[Label]:
        """The label vocabulary, in id order (empty when the file has no labels)."""
        return label_vocabulary(self.label_counts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "num_records": self.num_records,
            "num_chars": self.num_chars,
            "num_bytes": self.num_bytes,
            "labels": self.labels,
            "label_counts": [[label, self.label_counts[label]] for label in self.labels],
        }


def summarize(
    path: str | os.PathLike[str],
    fmt: Format | None = None,
    text_field: str = "text",
    label_field: str = "label",
    *,
    require_label: bool = False,
    max_example_bytes: int | None = None,
) -> DatasetSummary:
    """Read the whole file (validating every record, see ``iter_records``) and count records, characters and labels."""
    fmt = fmt or detect_format(path)
    summary = DatasetSummary(fmt, 0, 0, os.path.getsize(path))
    records = iter_records(
        path, fmt, text_field, label_field, require_label=require_label, max_example_bytes=max_example_bytes
    )
    for record in records:
        summary.num_records += 1
        summary.num_chars += len(record.text)
        if record.label is not None:
            summary.label_counts[record.label] = summary.label_counts.get(record.label, 0) + 1
    return summary


# --------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ``ByteLevel`` pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable, strict=True))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


def _byte_level(tokenizer: Tokenizer, split_words: bool) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def build_byte_tokenizer() -> Tokenizer:
    """Ids 0..255 = bytes of the UTF-8 text, then ``BYTE_SPECIAL_TOKENS`` (256, 257, 258)."""
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    # A BPE model without merges maps every byte character to its id: the byte value.
    tokenizer = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])), split_words=False)
    tokenizer.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    tokenizer.encode_special_tokens = True
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with at most ``vocab_size`` ids (specials 0..2, the 256 bytes, then merges)."""
    tokenizer = _byte_level(Tokenizer(models.BPE()), split_words=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BYTE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even unseen ones
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a ``tokenizer.json`` with ``encode_special_tokens`` on (the flag is not stored in the file)."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True
    return tokenizer


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {token} token")
    return int(token_id)


# --------------------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    """A completed preparation in ``work_dir`` (see the module docstring for its files)."""

    work_dir: Path
    meta: dict[str, Any]

    @classmethod
    def load(cls, work_dir: str | os.PathLike[str]) -> PreparedData:
        """Open a preparation; raises ``FileNotFoundError`` unless its ``COMPLETE`` marker exists."""
        root = Path(work_dir)
        if not (root / _MARKER).is_file():
            raise FileNotFoundError(f"{root} holds no complete data preparation")
        return cls(root, json.loads((root / "meta.json").read_text()))

    @property
    def task(self) -> str:
        return str(self.meta["task"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def pad_id(self) -> int:
        return int(self.meta["tokenizer"]["pad_id"])

    @property
    def bos_id(self) -> int:
        return int(self.meta["tokenizer"]["bos_id"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["tokenizer"]["eos_id"])

    @property
    def labels(self) -> list[Label] | None:
        """Label values in id order (classification), else None."""
        labels = self.meta.get("labels")
        return None if labels is None else list(labels)

    @property
    def tokenizer_path(self) -> Path:
        return self.work_dir / "tokenizer.json"

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped read-only."""
        return np.memmap(self.work_dir / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")

    def offsets(self, split: str) -> np.ndarray:
        """Classification: int64 ``(n + 1,)`` start of each example in ``tokens(split)``."""
        return np.memmap(self.work_dir / f"{split}.idx", dtype=np.int64, mode="r")

    def label_ids(self, split: str) -> np.ndarray:
        """Classification: int64 ``(n,)`` label id of each example."""
        return np.memmap(self.work_dir / f"{split}.labels", dtype=np.int64, mode="r")


def _sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename: a reader sees the old file or the whole new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def preparation_settings(spec: Spec, fmt: Format) -> dict[str, Any]:
    """Every setting that changes what ``prepare`` writes (and nothing else: seq_len is a batching matter)."""
    d = spec.data
    return {
        "prep_format": PREP_FORMAT_VERSION,
        "format": fmt,
        "task": spec.model.task,
        "tokenizer": d.tokenizer,
        "bpe_vocab_size": (d.bpe_vocab_size or spec.model.vocab_size) if d.tokenizer == "bpe" else None,
        "val_fraction": d.val_fraction,
        "seed": spec.training.seed,
        "text_field": d.text_field,
        "label_field": d.label_field,
    }


def validation_mask(num_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean ``(num_documents,)``: which documents are held out. Exactly ``round(n * fraction)`` of them,
    at least 1 and at most ``n - 1``, chosen by a permutation seeded with ``seed`` (a pure function)."""
    num_val = min(num_documents - 1, max(1, round(num_documents * val_fraction)))
    mask = np.zeros(num_documents, dtype=bool)
    mask[np.random.default_rng(seed).permutation(num_documents)[:num_val]] = True
    return mask


def _split_texts(
    source: Path, fmt: Format, spec: Spec, is_val: np.ndarray, want_val: bool, max_example_bytes: int | None
) -> Iterator[Record]:
    classification = spec.model.task == "classification"
    d = spec.data
    records = iter_records(
        source, fmt, d.text_field, d.label_field, require_label=classification, max_example_bytes=max_example_bytes
    )
    for index, record in enumerate(records):
        if bool(is_val[index]) == want_val:
            yield record


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_split(
    tokenizer: Tokenizer,
    records: Iterable[Record],
    work_dir: Path,
    split: str,
    dtype: np.dtype[Any],
    eos_id: int,
    label_ids: dict[Label, int] | None,
) -> dict[str, int]:
    """Tokenize one split into ``{split}.bin`` (plus ``.idx``/``.labels`` for classification)."""
    documents = tokens = 0
    offsets: list[int] = [0]
    labels: list[int] = []
    with open(work_dir / f"{split}.bin", "wb") as out:
        for chunk in _chunks(records, _ENCODE_CHUNK):
            encodings = tokenizer.encode_batch([r.text for r in chunk], add_special_tokens=False)
            for record, encoding in zip(chunk, encodings, strict=True):
                ids = encoding.ids
                if label_ids is None:
                    ids = [*ids, eos_id]  # causal_lm: documents are separated by <eos>
                else:
                    assert record.label is not None  # require_label=True in classification
                    labels.append(label_ids[record.label])
                    offsets.append(offsets[-1] + len(ids))
                np.asarray(ids, dtype=dtype).tofile(out)
                tokens += len(ids)
                documents += 1
        out.flush()
        os.fsync(out.fileno())
    if label_ids is not None:
        np.asarray(offsets, dtype=np.int64).tofile(work_dir / f"{split}.idx")
        np.asarray(labels, dtype=np.int64).tofile(work_dir / f"{split}.labels")
    return {"documents": documents, "tokens": tokens}


def prepare(
    spec: Spec,
    source_path: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    *,
    max_example_bytes: int | None = None,
    tokenizer_file: str | os.PathLike[str] | None = None,
) -> PreparedData:
    """Validate, split, train/build the tokenizer and tokenize ``source_path`` into ``work_dir``.

    ``tokenizer_file``: tokenize with this ``tokenizer.json`` instead (a run that starts from an imported
    checkpoint keeps the checkpoint's token ids); it must have the ``<eos>``, ``<pad>`` and ``<bos>`` tokens.

    Idempotent: a previous complete preparation of the same file content with the same settings
    (its ``COMPLETE`` marker holds the fingerprint) is reused as is; anything else in ``work_dir`` is
    prepared again from scratch. Concurrent callers on one ``work_dir`` are serialised by a file lock.

    The split is by document: ``validation_mask(n, data.val_fraction, training.seed)``. Raises
    ``DataFormatError`` for a bad file, fewer than 2 documents, an example over ``max_example_bytes`` (see
    ``iter_records``), or (classification) more distinct labels than ``model.num_labels``.
    """
    source = Path(source_path)
    root = Path(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    fmt = detect_format(source)
    settings = preparation_settings(spec, fmt)
    if tokenizer_file is not None:
        settings["tokenizer_file_sha256"] = _sha256_file(tokenizer_file)
    source_sha = _sha256_file(source)
    fingerprint = hashlib.sha256(json.dumps([settings, source_sha], sort_keys=True).encode()).hexdigest()

    # One preparer per work_dir at a time: two tasks for the same job (a retried Celery task racing the
    # original) must not interleave their writes. flock is released by the kernel if the holder dies.
    with open(root / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = root / _MARKER
        if marker.is_file() and marker.read_text().strip() == fingerprint:
            return PreparedData.load(root)
        marker.unlink(missing_ok=True)  # from here on the directory is incomplete until the marker returns
        return _prepare_unlocked(
            spec, source, root, fmt, settings, source_sha, fingerprint, max_example_bytes, tokenizer_file
        )


def _prepare_unlocked(
    spec: Spec,
    source: Path,
    root: Path,
    fmt: Format,
    settings: dict[str, Any],
    source_sha: str,
    fingerprint: str,
    max_example_bytes: int | None,
    tokenizer_file: str | os.PathLike[str] | None = None,
) -> PreparedData:
    classification = spec.model.task == "classification"
    d = spec.data
    # Pass 1: validate every record before spending time on a tokenizer, and learn the labels.
    summary = summarize(
        source, fmt, d.text_field, d.label_field, require_label=classification, max_example_bytes=max_example_bytes
    )
    if summary.num_records < 2:
        raise DataFormatError(
            source, None, "at least 2 documents are needed to hold out validation data (TXT: separate "
            "documents by a blank line)",
        )  # fmt: skip
    label_values: list[Label] | None = None
    label_ids: dict[Label, int] | None = None
    if classification:
        label_values = summary.labels
        num_labels = spec.model.num_labels or 0
        if len(label_values) > num_labels:
            raise DataFormatError(
                source, None, f"{len(label_values)} distinct labels but model.num_labels is {num_labels}"
            )
        label_ids = {label: i for i, label in enumerate(label_values)}
    is_val = validation_mask(summary.num_records, d.val_fraction, spec.training.seed)

    # Pass 2 (bpe only): train the tokenizer on the training documents, so validation stays unseen.
    if tokenizer_file is not None:
        tokenizer = load_tokenizer(tokenizer_file)
    elif d.tokenizer == "bpe":
        vocab = d.bpe_vocab_size or spec.model.vocab_size
        texts = (r.text for r in _split_texts(source, fmt, spec, is_val, False, max_example_bytes))
        tokenizer = train_bpe_tokenizer(texts, vocab)
    else:
        tokenizer = build_byte_tokenizer()
    tokenizer.save(str(root / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size > spec.model.vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} ids but model.vocab_size is {spec.model.vocab_size}")
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    eos_id = _special_id(tokenizer, "<eos>")

    # Pass 3: tokenize each split into its memory-mappable files.
    splits = {
        split: _write_split(
            tokenizer,
            _split_texts(source, fmt, spec, is_val, split == "val", max_example_bytes),
            root,
            split,
            dtype,
            eos_id,
            label_ids,
        )
        for split in ("train", "val")
    }
    meta = {
        "version": PREP_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "task": spec.model.task,
        "format": fmt,
        "settings": settings,
        "source": {"name": source.name, "sha256": source_sha, "bytes": summary.num_bytes},
        "tokenizer": {
            "kind": d.tokenizer,
            "file": "tokenizer.json",
            "vocab_size": vocab_size,
            "pad_id": _special_id(tokenizer, "<pad>"),
            "bos_id": _special_id(tokenizer, "<bos>"),
            "eos_id": eos_id,
        },
        "dtype": dtype.name,
        "labels": label_values,
        "splits": splits,
        "summary": summary.to_dict(),
    }
    if label_values is not None:
        _write_atomic(root / "labels.json", json.dumps(label_values))
    _write_atomic(root / "meta.json", json.dumps(meta, indent=2))
    _write_atomic(root / _MARKER, fingerprint + "\n")  # last: the preparation is complete from here
    return PreparedData(root, meta)


# --------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One micro-batch. causal_lm: labels ``(B, T)`` (-100 on pads), no mask. classification: labels
    ``(B,)`` and ``attention_mask`` ``(B, T)`` (1 = real token, pads on the right)."""

    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) or (B,) int64
    attention_mask: torch.Tensor | None  # (B, T) int64 or None


class _Examples:
    """Builds padded examples of one split by index (windows for causal_lm, rows for classification)."""

    def __init__(self, prepared: PreparedData, split: str, seq_len: int) -> None:
        if seq_len < 2:
            raise ValueError("seq_len must be at least 2")
        self.prepared = prepared
        self.seq_len = seq_len
        self.classification = prepared.task == "classification"
        self.tokens = prepared.tokens(split)
        if self.classification:
            self.offsets = prepared.offsets(split)
            self.label_ids = prepared.label_ids(split)
            self.count = len(self.label_ids)
        else:
            self.count = math.ceil(len(self.tokens) / seq_len)
        if self.count == 0:
            raise ValueError(f"split {split!r} is empty")

    def build(self, indices: np.ndarray) -> Batch:
        B, T = len(indices), self.seq_len
        ids = np.full((B, T), self.prepared.pad_id, dtype=np.int64)
        if self.classification:
            mask = np.zeros((B, T), dtype=np.int64)
            for row, i in enumerate(indices):
                start, end = int(self.offsets[i]), int(self.offsets[i + 1])
                end = min(end, start + T - 1)  # room for the closing <eos> the classifier pools on
                n = end - start
                ids[row, :n] = self.tokens[start:end]
                ids[row, n] = self.prepared.eos_id
                mask[row, : n + 1] = 1
            labels = np.asarray(self.label_ids[indices], dtype=np.int64)
            return Batch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(mask))
        targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        for row, w in enumerate(indices):
            window = self.tokens[int(w) * T : (int(w) + 1) * T]  # the last window may be short
            ids[row, : len(window)] = window
            targets[row, : len(window)] = window
        return Batch(torch.from_numpy(ids), torch.from_numpy(targets), None)


class Batches:
    """An endless, deterministic stream of micro-batches of one split, with an exact resumable cursor.

    Epoch ``e`` visits every example once in the order ``default_rng([seed, e]).permutation(n)``
    (``shuffle=False``: in order). A batch that runs past the end of an epoch continues into the next, so
    every batch is full. ``state_dict()`` is ``{epoch, position, batches_drawn, ...}``; a fresh ``Batches``
    given it with ``load_state_dict`` yields the very batch the original would have yielded next.
    """

    def __init__(
        self,
        prepared: PreparedData,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int,
        *,
        shuffle: bool = True,
    ) -> None:
        self.split = split
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self._examples = _Examples(prepared, split, seq_len)
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next example
        self.batches_drawn = 0  # micro-batches yielded since the start of training (names a batch)
        self._order_epoch = -1
        self._order = np.arange(0)

    @property
    def num_examples(self) -> int:
        return self._examples.count

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = self.num_examples
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        picked: list[np.ndarray] = []
        needed = self.batch_size
        while needed:
            order = self._epoch_order()
            take = order[self.position : self.position + needed]
            picked.append(take)
            needed -= len(take)
            self.position += len(take)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        self.batches_drawn += 1
        return self._examples.build(np.concatenate(picked))

    @property
    def epoch_progress(self) -> float:
        """Epochs completed, fractional."""
        return self.epoch + self.position / self.num_examples

    def state_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "num_examples": self.num_examples,
            "epoch": self.epoch,
            "position": self.position,
            "batches_drawn": self.batches_drawn,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cursor; refuses one taken over different data or settings (it would not be exact)."""
        for key in ("split", "seed", "shuffle", "seq_len", "num_examples"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data cursor was saved with {key}={state[key]!r}, this stream has "
                    f"{getattr(self, key)!r}: the data or its settings changed"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.batches_drawn = int(state["batches_drawn"])


def eval_batches(
    prepared: PreparedData, split: str, batch_size: int, seq_len: int, max_batches: int
) -> Iterator[Batch]:
    """The first ``max_batches`` batches of ``split`` in order, each example at most once (the last batch
    may be smaller): the same examples at every evaluation, so evaluations are comparable."""
    examples = _Examples(prepared, split, seq_len)
    for b in range(max_batches):
        start = b * batch_size
        if start >= examples.count:
            return
        yield examples.build(np.arange(start, min(start + batch_size, examples.count)))


def preview(
    path: str | os.PathLike[str],
    fmt: Format | None = None,
    text_field: str = "text",
    label_field: str = "label",
    limit: int = 5,
) -> list[Record]:
    """The first ``limit`` records (for previews); stops reading early, so it never scans a large file."""
    out: list[Record] = []
    for record in iter_records(path, fmt, text_field, label_field):
        out.append(record)
        if len(out) == limit:
            break
    return out


# --------------------------------------------------------------------------------------------------------
# Added for the web's upload form (builder/datasets), which knows a file's name before any of its bytes.
# --------------------------------------------------------------------------------------------------------


def format_from_name(name: str | os.PathLike[str]) -> Format | None:
    """The format ``name``'s extension implies (``detect_format``'s table), or None; never opens a file."""
    return _EXTENSIONS.get(Path(name).suffix.lower())
