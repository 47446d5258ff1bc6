"""Cleaning: a new version of a dataset, with a report of what was changed or removed and why.

Pure Python (no Django): reads local files through the engine's readers and writes JSON Lines (``text`` and,
when the source has labels, ``label``) into a folder. Steps, in order, for each example:

1. Unicode normalisation (NFC by default, NFKC, or none).
2. Whitespace normalisation: line endings become ``\\n``; Unicode spaces (no-break, thin, ideographic ...) become
   a plain space; zero-width characters and byte-order marks are removed; trailing spaces on each line are removed;
   runs of blank lines become one; leading and trailing whitespace is removed. Indentation inside the text is kept
   (code in docstrings depends on it).
3. Optional lowercasing.
4. Removal, the first reason that applies being reported: ``empty`` (nothing left), ``too_short``
   (fewer than ``min_chars`` characters), ``too_long`` (more than ``max_chars``), ``exact_duplicate`` (the same
   text, after the steps above, as a kept example), ``near_duplicate`` (MinHash estimate of the Jaccard similarity
   of word 3-gram sets with a kept example at or above ``near_duplicate_threshold``; datasketch's LSH finds the
   candidates, the estimate confirms them). Words are compared normalised (``comparison_words``: NFKC, case-folded,
   punctuation and symbols removed, any whitespace a separator), so copies that differ only in punctuation, casing
   or spacing share every 3-gram; a text with no word left is never a near duplicate.
5. Split: ``validation_mask(kept, val_fraction, seed)`` from the engine, the same rule the trainer uses to hold
   out data, writes ``train.jsonl`` and ``validation.jsonl``; without a split everything goes to ``train.jsonl``.

The first occurrence of a text is the one kept, so the result depends only on the input order and the options.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasketch import MinHash, MinHashLSH
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from builder.datasets.analysis import Progress, Source, scan_file
from workers.engine.data import Label, validation_mask

REMOVAL_REASONS = ("empty", "too_short", "too_long", "exact_duplicate", "near_duplicate")
EXAMPLES_PER_REASON = 5
EXAMPLE_TEXT_CHARS = 200
NUM_PERM = 128  # MinHash permutations: the estimate's standard error is about 1/sqrt(128) ≈ 0.09 at J = 0.5
SHINGLE_WORDS = 3
MINHASH_SCHEME: Literal["affine32"] = "affine32"  # datasketch 2's default: unbiased, uint32 hash values
MINHASH_SEED = 1  # fixed: the same texts always get the same signatures, so cleaning is reproducible

_UNICODE_SPACES = re.compile(r"[^\S\n\t]")  # any whitespace except newline and tab, e.g. U+00A0, U+2009, U+3000
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_BLANK_RUNS = re.compile(r"\n{3,}")
# Underscore is a word character to \w, but a separator like other punctuation here.
_NOT_WORD = re.compile(r"[^\w\s]|_")


class CleaningOptions(BaseModel):
    """What a cleaning run does. Every field has a default; unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")

    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normalisation form; NFKC also folds compatibility characters (ﬁ → fi, ① → 1)."
    )
    normalize_whitespace: bool = Field(True, description="Normalise line endings, spaces and blank lines.")
    lowercase: bool = Field(False, description="Lowercase every text.")
    min_chars: int = Field(1, ge=1, le=1_000_000, description="Remove texts shorter than this (characters).")
    max_chars: int | None = Field(
        None, ge=1, le=100_000_000, description="Remove texts longer than this (characters); null: no limit."
    )
    drop_exact_duplicates: bool = Field(True, description="Remove texts equal to an earlier kept text.")
    drop_near_duplicates: bool = Field(True, description="Remove texts nearly equal to an earlier kept text.")
    near_duplicate_threshold: float = Field(
        0.85, ge=0.5, le=1.0, description="Estimated Jaccard similarity of word 3-grams at which a text is removed."
    )
    val_fraction: float = Field(
        0.0, ge=0.0, le=0.5, description="Fraction held out as a validation split; 0: no split."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the split.")

    @field_validator("max_chars")
    @classmethod
    def _at_least_min_chars(cls, value: int | None, info: ValidationInfo) -> int | None:
        # A field validator (not a model one), so that the error names max_chars.
        min_chars = info.data.get("min_chars")
        if value is not None and isinstance(min_chars, int) and value < min_chars:
            raise ValueError(f"max_chars ({value}) must be at least min_chars ({min_chars})")
        return value


class CleaningError(ValueError):
    """The options leave nothing usable (for example every example removed)."""


@dataclass(frozen=True)
class CleaningResult:
    train_path: Path
    validation_path: Path | None
    report: dict[str, Any]


def normalize_whitespace(text: str) -> str:
    """Step 2 of the module docstring."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", text)
    text = _UNICODE_SPACES.sub(" ", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def comparison_words(text: str) -> list[str]:
    """The words of ``text`` as near-duplicate detection compares them: NFKC (fullwidth and ligature forms fold to
    plain letters), case-folded, every character that is neither a word character nor whitespace (punctuation,
    symbols) turned into a separator, split on any whitespace.

    Without this, ``"Hello, world."`` and ``"hello world"`` shared no 3-gram: such copies scored below unrelated rows.
    """
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()


def shingles(text: str) -> set[bytes]:
    """Word 3-grams of ``comparison_words(text)``; a text of fewer words is one shingle of all its words, a text of
    none has no shingle (nothing to compare: never a near duplicate)."""
    words = comparison_words(text)
    if not words:
        return set()
    if len(words) < SHINGLE_WORDS:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + SHINGLE_WORDS]).encode("utf-8") for i in range(len(words) - SHINGLE_WORDS + 1)}


class NearDuplicateIndex:
    """MinHash LSH over the kept texts; ``find`` returns the key of a kept text at or above the threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        # The permutations are drawn once and shared: drawing them per MinHash costs more than hashing a text.
        self._permutations = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, scheme=MINHASH_SCHEME).permutations
        self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        # Signatures of kept texts, to confirm LSH candidates (affine32 hash values are uint32: 512 bytes a text).
        self._signatures: dict[int, np.ndarray] = {}

    def signature(self, text: str) -> MinHash | None:
        """The MinHash of ``text``'s shingles; None when it has none (an empty set's MinHash equals every other's)."""
        grams = shingles(text)
        if not grams:
            return None
        minhash = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, permutations=self._permutations, scheme=MINHASH_SCHEME)
        minhash.update_batch(list(grams))
        return minhash

    def find(self, minhash: MinHash) -> int | None:
        """The earliest kept key whose estimated similarity reaches the threshold, else None."""
        values = minhash.hashvalues
        best: int | None = None
        for key in self._lsh.query(minhash):
            if float(np.mean(self._signatures[key] == values)) >= self.threshold and (best is None or key < best):
                best = key
        return best

    def add(self, key: int, minhash: MinHash) -> None:
        self._lsh.insert(key, minhash, check_duplication=False)
        self._signatures[key] = minhash.hashvalues


def _excerpt(text: str) -> str:
    return text if len(text) <= EXAMPLE_TEXT_CHARS else text[:EXAMPLE_TEXT_CHARS] + "…"


def clean(
    sources: Sequence[Source],
    out_dir: Path,
    options: CleaningOptions,
    progress: Callable[[float], None] | None = None,
) -> CleaningResult:
    """Clean ``sources`` (read in order, validated by the readers) into ``out_dir``; see the module docstring.

    Raises ``DataFormatError`` for a malformed source and ``CleaningError`` when nothing is left.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    meter = Progress([scan_file(s.path)[0] for s in sources], progress)
    removed = dict.fromkeys(REMOVAL_REASONS, 0)
    removed_examples: dict[str, list[dict[str, Any]]] = {reason: [] for reason in REMOVAL_REASONS}
    modified = {"unicode": 0, "whitespace": 0, "lowercase": 0}
    kept_by_digest: dict[bytes, int] = {}
    kept_where: list[tuple[str | None, int]] = []  # (split of the source, line) of each kept text, by key
    near = NearDuplicateIndex(options.near_duplicate_threshold) if options.drop_near_duplicates else None
    has_labels = any(s.label_field for s in sources)
    examples = 0
    kept_path = out_dir / "kept.jsonl.tmp"

    def drop(reason: str, text: str, where: dict[str, Any]) -> None:
        removed[reason] += 1
        if len(removed_examples[reason]) < EXAMPLES_PER_REASON:
            removed_examples[reason].append({**where, "text": _excerpt(text)})

    with kept_path.open("w", encoding="utf-8") as kept_file:
        for index, source in enumerate(sources):
            for record in source.records():
                examples += 1
                meter.at(index, record.line)
                where: dict[str, Any] = {"line": record.line, "split": source.split}
                text = record.text
                if options.unicode_form != "none":
                    normal = unicodedata.normalize(options.unicode_form, text)
                    modified["unicode"] += normal != text
                    text = normal
                if options.normalize_whitespace:
                    normal = normalize_whitespace(text)
                    modified["whitespace"] += normal != text
                    text = normal
                if options.lowercase:
                    lower = text.lower()
                    modified["lowercase"] += lower != text
                    text = lower
                if not text.strip():
                    drop("empty", record.text, where)
                    continue
                if len(text) < options.min_chars:
                    drop("too_short", text, {**where, "chars": len(text)})
                    continue
                if options.max_chars is not None and len(text) > options.max_chars:
                    drop("too_long", text, {**where, "chars": len(text)})
                    continue
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if options.drop_exact_duplicates and digest in kept_by_digest:
                    split, line = kept_where[kept_by_digest[digest]]
                    drop("exact_duplicate", text, {**where, "duplicate_of": {"line": line, "split": split}})
                    continue
                key = len(kept_where)
                signature = near.signature(text) if near is not None else None
                if near is not None and signature is not None:
                    match = near.find(signature)
                    if match is not None:
                        split, line = kept_where[match]
                        drop("near_duplicate", text, {**where, "duplicate_of": {"line": line, "split": split}})
                        continue
                    near.add(key, signature)
                kept_by_digest.setdefault(digest, key)
                kept_where.append((source.split, record.line))
                kept_file.write(_json_line(text, record.label, has_labels))

    kept = len(kept_where)
    if kept == 0:
        kept_path.unlink(missing_ok=True)
        raise CleaningError(
            f"nothing is left after cleaning: all {examples} examples were removed "
            f"({', '.join(f'{k} {v}' for k, v in removed.items() if v)})"
        )
    train_path = out_dir / "train.jsonl"
    validation_path: Path | None = None
    split_note = ""
    if options.val_fraction > 0 and kept >= 2:
        validation_path = out_dir / "validation.jsonl"
        held_out = validation_mask(kept, options.val_fraction, options.seed)
        with (
            kept_path.open(encoding="utf-8") as src,
            train_path.open("w", encoding="utf-8") as train,
            validation_path.open("w", encoding="utf-8") as val,
        ):
            for i, row in enumerate(src):
                (val if held_out[i] else train).write(row)
        kept_path.unlink()
        counts = {"train": int(kept - held_out.sum()), "validation": int(held_out.sum())}
    else:
        kept_path.replace(train_path)
        counts = {"train": kept, "validation": 0}
        if options.val_fraction > 0:
            split_note = "no split: fewer than 2 examples were kept"

    report = {
        "input_examples": examples,
        "kept": kept,
        "removed_total": examples - kept,
        "removed": removed,
        "removed_examples": {k: v for k, v in removed_examples.items() if v},
        "modified": modified,
        "split": {**counts, "val_fraction": options.val_fraction, "seed": options.seed, "note": split_note},
        "options": options.model_dump(),
    }
    return CleaningResult(train_path, validation_path, report)


def _json_line(text: str, label: Label | None, has_labels: bool) -> str:
    record: dict[str, Any] = {"text": text}
    if has_labels and label is not None:
        record["label"] = label
    return json.dumps(record, ensure_ascii=False) + "\n"
