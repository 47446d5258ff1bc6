"""Near-duplicate cleaning finds copies that differ by punctuation, casing, spacing, compatibility forms or one word,
and removes no unrelated row: before words were normalised, copies differing by punctuation and casing scored below
unrelated rows and were all kept.

The corpus is generated: sentence-like texts of pseudo-words with capitals, commas and full stops; each near
duplicate is a known edit of a known original; the controls are new texts, texts sharing half of an original, and
an original's words in another order.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.datasets.analysis import Source
from builder.datasets.cleaning import CleaningOptions, clean, comparison_words, shingles

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "gu", "zo", "fi", "be", "ho", "ya"]


def _vocabulary(size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


VOCABULARY = _vocabulary(3000, seed=11)


def sentence_text(rng: random.Random, words: int = 120) -> str:
    """Sentences of 6-14 words: the first capitalised, commas now and then, a full stop or a question mark."""
    out: list[str] = []
    while len(out) < words:
        sentence = [rng.choice(VOCABULARY) for _ in range(rng.randint(6, 14))]
        sentence[0] = sentence[0].capitalize()
        for i in range(1, len(sentence) - 1):
            if rng.random() < 0.12:
                sentence[i] += ","
        sentence[-1] += rng.choice([".", ".", ".", "?", "!"])
        out.extend(sentence)
    return " ".join(out[:words]).rstrip(",") + "."


def _no_punctuation(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text)


def _other_punctuation(text: str) -> str:
    # Full stops become semicolons and exclamation marks, commas go, quotes and a dash appear.
    text = text.replace(",", "").replace(". ", "; ", 3).replace(". ", "! ")
    words = text.split()
    words[5] = f'"{words[5]}"'
    words[20] = f"({words[20]})"
    words.insert(40, "—")
    return " ".join(words)


def _tight_punctuation(text: str) -> str:
    return text.replace(", ", ",").replace(". ", ".")  # "one,two.Three": no space after the marks


def _fullwidth(text: str) -> str:
    # ASCII letters as their fullwidth forms (NFKC folds them back).
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def _changed_word(text: str) -> str:
    words = text.split()
    words[len(words) // 2] = "zzchanged"
    return " ".join(words)


def _spacing(text: str) -> str:
    words = text.split()
    separators = ["\n", "\t", "   ", "\u00a0", " \n\n "]
    return "".join(w + separators[i % len(separators)] for i, w in enumerate(words)).strip()


NEAR_DUPLICATES: dict[str, Callable[[str], str]] = {
    "punctuation removed": _no_punctuation,
    "punctuation changed": _other_punctuation,
    "no space after punctuation": _tight_punctuation,
    "upper case": str.upper,
    "lower case": str.lower,
    "title case": str.title,
    "spacing": _spacing,
    "fullwidth letters": _fullwidth,
    "one word changed": _changed_word,
    "lower case, no punctuation, new lines": lambda t: _no_punctuation(t).lower().replace(" ", "\n"),
}


def build(path: Path) -> tuple[dict[int, int], set[int], int]:
    """Writes the corpus; returns ({line of a near duplicate: line of its original}, lines of controls, rows)."""
    rng = random.Random(5)
    originals = [sentence_text(rng) for _ in range(len(NEAR_DUPLICATES))]
    rows: list[str] = list(originals)  # lines 1..n
    near: dict[int, int] = {}
    for i, edit in enumerate(NEAR_DUPLICATES.values()):
        rows.append(edit(originals[i]))
        near[len(rows)] = i + 1
    controls: set[int] = set()
    other = random.Random(99)
    for _ in range(8):
        rows.append(sentence_text(other))  # unrelated
        controls.add(len(rows))
    for i in range(4):
        half = originals[i].split()[:60]  # shares half of an original: Jaccard about 1/3
        rows.append(" ".join(half) + " " + sentence_text(other, 60))
        controls.add(len(rows))
    for i in range(4, 7):
        shuffled = originals[i].split()
        random.Random(i).shuffle(shuffled)  # the same words in another order: no 3-gram in common, or few
        rows.append(" ".join(shuffled))
        controls.add(len(rows))
    lines = (json.dumps({"text": r, "label": n}, ensure_ascii=False) + "\n" for n, r in enumerate(rows, start=1))
    path.write_text("".join(lines), encoding="utf-8")
    return near, controls, len(rows)


@pytest.mark.parametrize(
    "options",
    [
        CleaningOptions(),
        # The comparison normalises on its own: it does not depend on the cleaning's own normalisation options.
        CleaningOptions(unicode_form="none", normalize_whitespace=False),
    ],
    ids=["default options", "no unicode or whitespace normalisation"],
)
def test_every_near_duplicate_is_found_and_no_control_is(tmp_path: Path, options: CleaningOptions) -> None:
    path = tmp_path / "corpus.jsonl"
    near, controls, total = build(path)
    result = clean([Source(path, "jsonl", label_field="label")], tmp_path / "out", options)
    # Each row's label is its line number, so the kept rows say exactly which lines were kept.
    kept = {json.loads(line)["label"] for line in result.train_path.read_text().splitlines()}
    assert kept == set(range(1, total + 1)) - set(near)
    assert controls <= kept
    report = result.report
    assert report["removed"]["near_duplicate"] == len(near) == report["removed_total"]
    for row in report["removed_examples"]["near_duplicate"]:  # the report shows the first 5, with their original
        assert near[row["line"]] == row["duplicate_of"]["line"]


def test_each_kind_of_near_duplicate_shares_most_3_grams_and_controls_share_few() -> None:
    rng = random.Random(5)
    original = sentence_text(rng)
    base = shingles(original)
    for kind, edit in NEAR_DUPLICATES.items():
        other = shingles(edit(original))
        jaccard = len(base & other) / len(base | other)
        assert jaccard >= 0.95 if kind == "one word changed" else jaccard == 1.0, (kind, jaccard)
    unrelated = shingles(sentence_text(random.Random(99)))
    assert len(base & unrelated) / len(base | unrelated) < 0.05


def test_texts_without_words_are_never_near_duplicates(tmp_path: Path) -> None:
    assert comparison_words("Hello, World!  ＨＥＬＬＯ_there") == ["hello", "world", "hello", "there"]
    assert shingles("?!… —") == set()
    path = tmp_path / "symbols.jsonl"
    rows = ["!!!", "???", "— … —", "Hello, world.", "hello world"]
    path.write_text("".join(json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in rows))
    report = clean([Source(path, "jsonl")], tmp_path / "out", CleaningOptions()).report
    # The three rows of punctuation only are all kept; the two greetings are one text to the comparison.
    assert report["removed"]["near_duplicate"] == 1 and report["kept"] == 4
    assert report["removed_examples"]["near_duplicate"][0]["line"] == 5
