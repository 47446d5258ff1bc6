"""Cleaning: exact counts on a constructed corpus, the seeded split, and a new version through the worker code."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from builder.datasets import processing, services, storage
from builder.datasets.analysis import Source
from builder.datasets.cleaning import CleaningError, CleaningOptions, clean, normalize_whitespace
from builder.datasets.models import Dataset, DatasetState, Origin

VOCABULARY = [f"w{i}" for i in range(5000)]


def _unique_texts(n: int, words: int, seed: int) -> list[str]:
    """Texts of random words from a large vocabulary: any two share almost no word 3-gram."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCABULARY) for _ in range(words)) + " café" for _ in range(n)]


def build_corpus(path: Path) -> dict[str, int]:
    """A corpus with a known number of each problem; returns the expected removals."""
    originals = _unique_texts(20, 100, seed=1)
    rows: list[dict[str, Any]] = [{"text": t, "label": i % 3} for i, t in enumerate(originals)]
    exact = [
        originals[0],  # byte-identical
        "  " + originals[1].replace(" ", "\u00a0", 3) + "\r\n",  # no-break spaces, padding, CRLF
        unicodedata.normalize("NFD", originals[2]),  # "café" decomposed: equal after NFC
        originals[3].replace(" w", "  \n\n\n\n w", 1),  # a run of blank lines becomes one... not equal
        originals[4] + "\u200b",  # a zero-width space
    ]
    near = []
    for i in (5, 6, 7, 8):
        words = originals[i].split()
        words[-2] = "changed"  # one word of 101: about 97% of the 3-grams are shared
        near.append(" ".join(words))
    rows += [{"text": t, "label": 0} for t in exact + near]
    rows += [{"text": t, "label": 1} for t in ("", " \n\t ")]  # empty after normalisation
    rows += [{"text": t, "label": 1} for t in ("tiny", "short one", "still too short")]  # < 20 characters
    rows += [{"text": "x " * 3000, "label": 2}, {"text": "y" * 7000, "label": 2}]  # > 5000 characters
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    # originals[3] with extra blank lines keeps a blank line inside: not equal to the original, but a near
    # duplicate (its words and 3-grams are the same).
    return {"empty": 2, "too_short": 3, "too_long": 2, "exact_duplicate": 4, "near_duplicate": 5}


OPTIONS = CleaningOptions(min_chars=20, max_chars=5000, val_fraction=0.25, seed=7)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_removal_counts_are_exact(tmp_path: Path) -> None:
    source = tmp_path / "corpus.jsonl"
    expected = build_corpus(source)
    result = clean([Source(source, "jsonl", "text", "label")], tmp_path / "out", OPTIONS)
    report = result.report
    assert report["removed"] == expected
    assert report["input_examples"] == 36 and report["kept"] == 20 and report["removed_total"] == 16
    assert report["modified"]["unicode"] == 1  # the NFD copy
    # Whitespace changed: the padded/NBSP copy, the blank-line copy, the zero-width copy, the tab-only row and
    # the "x x x ... x " row (its trailing space).
    assert report["modified"]["whitespace"] == 5
    duplicate_of = {row["line"]: row["duplicate_of"]["line"] for row in report["removed_examples"]["exact_duplicate"]}
    assert duplicate_of == {21: 1, 22: 2, 23: 3, 25: 5}  # the first occurrence is always the one kept
    near_of = {row["line"]: row["duplicate_of"]["line"] for row in report["removed_examples"]["near_duplicate"]}
    assert near_of == {24: 4, 26: 6, 27: 7, 28: 8, 29: 9}

    train, validation = _read(result.train_path), _read(result.validation_path or Path("missing"))
    assert (len(train), len(validation)) == (15, 5)  # round(20 × 0.25) held out
    kept = {r["text"] for r in train + validation}
    originals = _unique_texts(20, 100, seed=1)
    assert kept == set(originals)
    assert {r["text"]: r["label"] for r in train + validation} == {t: i % 3 for i, t in enumerate(originals)}
    assert report["split"] == {"train": 15, "validation": 5, "val_fraction": 0.25, "seed": 7, "note": ""}


def test_the_split_is_a_function_of_the_seed(tmp_path: Path) -> None:
    source = tmp_path / "corpus.jsonl"
    build_corpus(source)

    def held_out(seed: int, name: str) -> list[str]:
        options = OPTIONS.model_copy(update={"seed": seed})
        result = clean([Source(source, "jsonl", "text", "label")], tmp_path / name, options)
        assert result.validation_path is not None
        return [r["text"] for r in _read(result.validation_path)]

    assert held_out(7, "a") == held_out(7, "b")
    assert held_out(7, "a") != held_out(8, "c")


def test_options_change_what_is_removed(tmp_path: Path) -> None:
    source = tmp_path / "small.txt"
    source.write_text("Hello there friend\n\nhello there friend\n\nHELLO THERE FRIEND\n\nsomething else entirely\n")
    sources = [Source(source, "txt")]
    plain = clean(sources, tmp_path / "a", CleaningOptions(drop_near_duplicates=False)).report
    assert plain["removed"]["exact_duplicate"] == 0 and plain["kept"] == 4
    lower = clean(sources, tmp_path / "b", CleaningOptions(lowercase=True, drop_near_duplicates=False)).report
    assert lower["removed"]["exact_duplicate"] == 2 and lower["modified"]["lowercase"] == 2
    # Shingles are case-folded, so without lowercasing the three greetings are near duplicates.
    near = clean(sources, tmp_path / "c", CleaningOptions()).report
    assert near["removed"]["near_duplicate"] == 2 and near["kept"] == 2
    assert near["split"]["validation"] == 0 and plain["split"]["note"] == ""


def test_nothing_left_is_an_error(tmp_path: Path) -> None:
    source = tmp_path / "short.jsonl"
    source.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(CleaningError, match="nothing is left after cleaning: all 2 examples were removed"):
        clean([Source(source, "jsonl")], tmp_path / "out", CleaningOptions(min_chars=5))


def test_whitespace_normalisation_keeps_indentation() -> None:
    text = "\ufeff  Title\u00a0here  \r\n\r\n\r\n\r\n    indented code\t\n\u200bend  "
    assert normalize_whitespace(text) == "Title here\n\n    indented code\nend"


def test_options_are_validated_by_field() -> None:
    with pytest.raises(ValidationError) as raised:
        CleaningOptions.model_validate({"min_chars": 50, "max_chars": 10, "colour": "red", "val_fraction": 0.9})
    fields = {str(e["loc"][0]) for e in raised.value.errors()}
    assert fields == {"max_chars", "colour", "val_fraction"}


@pytest.mark.django_db
def test_cleaning_makes_a_new_version_in_storage(media_root: Path, tmp_path: Path, alice: Any) -> None:
    path = tmp_path / "corpus.jsonl"
    expected = build_corpus(path)
    name = storage.save_local_file(f"datasets/test/{tmp_path.name}/corpus.jsonl", path)
    source = Dataset.objects.create(
        owner=alice, name="corpus", format="jsonl", label_field="label", file_name=name, size_bytes=path.stat().st_size
    )
    assert processing.analyze_dataset(source.pk)["outcome"] == "ready"
    source.refresh_from_db()
    assert source.stats["duplicates"] == 1  # only the byte-identical copy is an exact duplicate before cleaning

    version = services.start_cleaning(alice, source, OPTIONS)
    assert version.state == DatasetState.QUEUED and version.origin == Origin.CLEANED and version.version == 2
    outcome = processing.clean_dataset(version.pk)
    version.refresh_from_db()
    assert outcome["outcome"] == "ready", version.error_message
    assert version.cleaning_report["removed"] == expected
    assert version.stats["examples"] == 20 and version.stats["duplicates"] == 0
    assert version.stats["splits"] == {"train": 15, "validation": 5}
    assert set(version.parts) == {"train", "validation"}
    with storage.local_copy(version.parts["validation"]) as local:
        assert len(local.read_text().splitlines()) == 5
    assert version.size_bytes == sum(storage.default_storage.size(n) for n in version.storage_names)

    again = services.start_cleaning(alice, source, CleaningOptions())
    assert again.version == 3  # the next number in the lineage
    services.delete_dataset(again)
