"""Tests of workers/engine/data.py: readers (every error with its line), tokenizers, preparation, batching."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from workers.engine.data import (
    Batches,
    DataFormatError,
    PreparedData,
    build_byte_tokenizer,
    detect_format,
    eval_batches,
    iter_records,
    label_vocabulary,
    load_tokenizer,
    prepare,
    preview,
    summarize,
    train_bpe_tokenizer,
    validation_mask,
)
from workers.engine.spec import Spec


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def error_of(path: Path, **kwargs: Any) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        list(iter_records(path, **kwargs))
    return info.value


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def spec_for(**overrides: Any) -> Spec:
    raw: dict[str, Any] = {
        "model": {
            "vocab_size": 400,
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "max_seq_len": 32,
            "moe": {"num_routed_experts": 4, "expert_hidden_size": 16},
        },
        "data": {"tokenizer": "bytes", "seq_len": 16, "val_fraction": 0.2},
        "training": {"max_steps": 10, "schedule": {"warmup_steps": 1}, "seed": 7},
    }
    for section, values in overrides.items():
        raw[section] = {**raw[section], **values}
    return Spec.model_validate(raw)


# --------------------------------------------------------------------------------------------------------
# Readers: formats and their errors
# --------------------------------------------------------------------------------------------------------


def test_detect_format_by_extension_and_content(tmp_path: Path) -> None:
    assert detect_format(write(tmp_path / "a.jsonl", "")) == "jsonl"
    assert detect_format(write(tmp_path / "a.NDJSON", "")) == "jsonl"
    assert detect_format(write(tmp_path / "a.csv", "")) == "csv"
    assert detect_format(write(tmp_path / "a.txt", "")) == "txt"
    assert detect_format(write(tmp_path / "noext", '\ufeff  {"text": "x"}\n')) == "jsonl"
    assert detect_format(write(tmp_path / "noext2", "plain words\n")) == "txt"


def test_jsonl_reads_text_labels_and_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"body": "one", "y": 1}\n\n{"body": "two", "y": 0}\n')
    records = list(iter_records(path, text_field="body", label_field="y"))
    assert [(r.text, r.label, r.line) for r in records] == [("one", 1, 1), ("two", 0, 3)]


def test_jsonl_accepts_byte_order_mark(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", b'\xef\xbb\xbf{"text": "x"}\n')
    assert [r.text for r in iter_records(path)] == ["x"]


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        ('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n', 3, "invalid JSON"),
        ('{"text": "a"}\n{"body": "b"}\n', 2, "missing field 'text'"),
        ('{"text": "a"}\n\n{"text": 5}\n', 3, "must be a string, found number"),
        ('{"text": "a"}\n["text"]\n', 2, "expected a JSON object, found array"),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n', 2, "mixed label types"),
        ('{"text": "a", "label": 1.5}\n', 1, "string or an integer, found number"),
        ('{"text": "a", "label": true}\n', 1, "found boolean"),
        ('[{"text": "a"},\n{"text": "b"}]\n', 1, "JSON array is not JSON Lines"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, content: str, line: int, fragment: str) -> None:
    error = error_of(write(tmp_path / "d.jsonl", content))
    assert error.line == line
    assert fragment in error.message
    assert str(error).startswith(f"{tmp_path / 'd.jsonl'}:{line}: ")


def test_jsonl_missing_label_only_when_required(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n')
    assert [r.label for r in iter_records(path)] == ["x", None]
    error = error_of(path, require_label=True)
    assert (error.line, error.message) == (2, "missing label field 'label'")


def test_invalid_utf8_reports_its_line_in_every_format(tmp_path: Path) -> None:
    bad = b"\xff\xfe broken"
    cases = {
        "d.jsonl": b'{"text": "ok"}\n{"text": "' + bad + b'"}\n',
        "d.txt": b"first paragraph\n\nsecond " + bad + b"\n",
        "d.csv": b"text,label\nfine,1\n" + bad + b",2\n",
    }
    expected_lines = {"d.jsonl": 2, "d.txt": 3, "d.csv": 3}
    for name, content in cases.items():
        error = error_of(write(tmp_path / name, content))
        assert error.line == expected_lines[name], name
        assert "invalid UTF-8 (byte 0xff" in error.message, name


@pytest.mark.parametrize("name", ["e.jsonl", "e.txt", "e.csv"])
@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_files_are_file_level_errors(tmp_path: Path, name: str, content: str) -> None:
    error = error_of(write(tmp_path / name, content))
    assert error.line is None
    assert "empty file" in error.message


def test_csv_header_only_is_empty(tmp_path: Path) -> None:
    error = error_of(write(tmp_path / "d.csv", "text,label\n"))
    assert error.line is None and "empty file" in error.message


def test_txt_documents_are_paragraphs(tmp_path: Path) -> None:
    path = write(tmp_path / "d.txt", "line one\r\nline two\r\n\r\n\n   \nsecond doc\n\n")
    records = list(iter_records(path))
    assert [(r.text, r.line) for r in records] == [("line one\nline two", 1), ("second doc", 6)]


def test_txt_cannot_carry_labels(tmp_path: Path) -> None:
    error = error_of(write(tmp_path / "d.txt", "x\n"), require_label=True)
    assert error.line is None and "TXT files carry no labels" in error.message


def test_csv_reads_columns_by_name_and_multiline_fields(tmp_path: Path) -> None:
    content = 'id,label,text\n1,pos,"spans\ntwo lines"\n2,neg,plain\n'
    records = list(iter_records(write(tmp_path / "d.csv", content)))
    assert [(r.text, r.label, r.line) for r in records] == [("spans\ntwo lines", "pos", 2), ("plain", "neg", 4)]


@pytest.mark.parametrize(
    ("content", "line", "fragment", "kwargs"),
    [
        ("body,label\nx,1\n", 1, "text column 'text' is not in the header", {}),
        ("text,text\nx,y\n", 1, "appears more than once", {}),
        ("text,label\nx,1\ny,2\nz,3,extra\n", 4, "expected 2 fields (the header's), found 3", {}),
        ('text,label\nx,1\n"never closed,2\n', 3, "malformed CSV", {}),
        ("text\nx\n", 1, "label column 'label' is not in the header", {"require_label": True}),
        ("text,label\nx,1\ny,\n", 3, "empty label", {"require_label": True}),
    ],
)
def test_csv_errors_name_the_line(
    tmp_path: Path, content: str, line: int, fragment: str, kwargs: dict[str, Any]
) -> None:
    error = error_of(write(tmp_path / "d.csv", content), **kwargs)
    assert error.line == line
    assert fragment in error.message


def test_csv_long_field_beyond_default_limit(tmp_path: Path) -> None:
    long_text = "word " * 40_000  # 200 kB, above csv's default 128 KiB field limit
    records = list(iter_records(write(tmp_path / "d.csv", f"text\n{long_text}\n")))
    assert records[0].text == long_text


def test_reader_streams_without_reading_ahead(tmp_path: Path) -> None:
    # The error is on line 3; the first two records must arrive before it is raised.
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b"}\n{oops\n')
    stream = iter_records(path)
    assert next(stream).text == "a"
    assert next(stream).text == "b"
    with pytest.raises(DataFormatError):
        next(stream)


def test_summarize_and_preview(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\nab,10\ncde,2\nf,10\n")
    summary = summarize(path, require_label=True)
    assert (summary.format, summary.num_records, summary.num_chars) == ("csv", 3, 6)
    assert summary.labels == ["2", "10"]  # numeric order, not text order
    assert summary.to_dict()["label_counts"] == [["2", 1], ["10", 2]]
    assert [r.text for r in preview(path, limit=2)] == ["ab", "cde"]


def test_label_vocabulary_orders() -> None:
    assert label_vocabulary([3, 1, 2, 1]) == [1, 2, 3]
    assert label_vocabulary(["b", "a"]) == ["a", "b"]
    assert label_vocabulary(["10", "9", "-1"]) == ["-1", "9", "10"]


# --------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------

SAMPLE = "Hello, wörld!\n\tcafé 😀 — <eos> stays text\r\n"


def test_byte_tokenizer_ids_are_bytes_and_round_trip(tmp_path: Path) -> None:
    tokenizer = build_byte_tokenizer()
    ids = tokenizer.encode(SAMPLE).ids
    assert ids == list(SAMPLE.encode("utf-8"))  # the literal "<eos>" is bytes, not id 258
    assert tokenizer.decode(ids, skip_special_tokens=False) == SAMPLE
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [256, 257, 258]
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    plain = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # a standard artifact
    assert plain.get_vocab_size() == 259
    assert plain.decode(list(SAMPLE.encode("utf-8"))) == SAMPLE
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(SAMPLE).ids == ids


def test_bpe_tokenizer_round_trips_and_respects_vocab(tmp_path: Path) -> None:
    corpus = [f"the cat number {i} sat on the mat; die Katze saß auf der Matte. " * 3 for i in range(300)]
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=320)
    assert tokenizer.get_vocab_size() <= 320
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
    ids = tokenizer.encode(SAMPLE).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == SAMPLE  # unseen chars via the byte alphabet
    assert 2 not in ids  # "<eos>" in the text is not the control token
    common = "the cat sat on the mat"
    assert len(tokenizer.encode(common).ids) < len(common.encode())  # merges were learned
    tokenizer.save(str(tmp_path / "t.json"))
    assert load_tokenizer(tmp_path / "t.json").encode(SAMPLE).ids == ids


# --------------------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------------------


def corpus_file(tmp_path: Path, n: int = 50) -> Path:
    return write(tmp_path / "corpus.jsonl", jsonl([{"text": f"document {i} " + "xy" * (i % 7)} for i in range(n)]))


def test_validation_mask_is_exact_seeded_and_never_empty() -> None:
    mask = validation_mask(100, 0.1, seed=1)
    assert mask.sum() == 10
    assert np.array_equal(mask, validation_mask(100, 0.1, seed=1))
    assert not np.array_equal(mask, validation_mask(100, 0.1, seed=2))
    assert validation_mask(3, 0.01, seed=0).sum() == 1  # at least one document held out
    assert validation_mask(2, 0.5, seed=0).sum() == 1  # at least one left to train on


def test_prepare_splits_by_document_and_writes_meta(tmp_path: Path) -> None:
    source = corpus_file(tmp_path)
    spec = spec_for()
    prepared = prepare(spec, source, tmp_path / "work")
    meta = prepared.meta
    assert meta["splits"]["train"]["documents"] == 40 and meta["splits"]["val"]["documents"] == 10
    assert prepared.tokens("train").dtype == np.uint16
    tokenizer = prepared.tokenizer()
    texts = {
        split: tokenizer.decode(prepared.tokens(split).tolist(), skip_special_tokens=False).split("<eos>")[:-1]
        for split in ("train", "val")
    }
    originals = [r.text for r in iter_records(source)]
    mask = validation_mask(50, 0.2, seed=7)
    assert texts["val"] == [t for t, v in zip(originals, mask, strict=True) if v]
    assert texts["train"] == [t for t, v in zip(originals, mask, strict=True) if not v]
    assert prepared.tokens("train")[-1] == prepared.eos_id
    assert (tmp_path / "work" / "COMPLETE").read_text().strip() == meta["fingerprint"]


def test_prepare_is_idempotent_and_redoes_incomplete_or_changed_work(tmp_path: Path) -> None:
    source = corpus_file(tmp_path)
    work = tmp_path / "work"
    first = prepare(spec_for(), source, work)
    train_bin = work / "train.bin"
    stamp = train_bin.stat().st_mtime_ns
    os.utime(train_bin, ns=(1, 1))  # a marker to see whether the file is rewritten
    again = prepare(spec_for(), source, work)
    assert again.meta == first.meta and train_bin.stat().st_mtime_ns == 1  # reused, not rewritten

    (work / "COMPLETE").unlink()  # as if the previous preparation crashed before its marker
    with pytest.raises(FileNotFoundError):
        PreparedData.load(work)
    prepare(spec_for(), source, work)
    assert train_bin.stat().st_mtime_ns != 1 and train_bin.stat().st_mtime_ns >= stamp

    changed = prepare(spec_for(training={"seed": 8}), source, work)  # another seed: another split
    assert changed.meta["fingerprint"] != first.meta["fingerprint"]


def test_prepare_bpe_uses_spec_vocab(tmp_path: Path) -> None:
    source = corpus_file(tmp_path, n=80)
    spec = spec_for(data={"tokenizer": "bpe", "bpe_vocab_size": 300})
    prepared = prepare(spec, source, tmp_path / "work")
    assert prepared.meta["tokenizer"]["kind"] == "bpe"
    assert 259 <= prepared.vocab_size <= 300
    assert Tokenizer.from_file(str(prepared.tokenizer_path)).get_vocab_size() == prepared.vocab_size
    assert int(prepared.tokens("train").max()) < prepared.vocab_size


def test_prepare_classification_labels(tmp_path: Path) -> None:
    rows = [{"text": f"review {i}", "label": ["neg", "pos", "meh"][i % 3]} for i in range(30)]
    source = write(tmp_path / "c.jsonl", jsonl(rows))
    spec = spec_for(model={"task": "classification", "num_labels": 3})
    prepared = prepare(spec, source, tmp_path / "work")
    assert prepared.labels == ["meh", "neg", "pos"]
    assert json.loads((tmp_path / "work" / "labels.json").read_text()) == ["meh", "neg", "pos"]
    mask = validation_mask(30, 0.2, seed=7)
    expected = [["meh", "neg", "pos"].index(str(r["label"])) for r in rows]
    assert prepared.label_ids("train").tolist() == [e for e, v in zip(expected, mask, strict=True) if not v]
    assert prepared.label_ids("val").tolist() == [e for e, v in zip(expected, mask, strict=True) if v]
    offsets = prepared.offsets("val")
    assert offsets[0] == 0 and offsets[-1] == len(prepared.tokens("val")) and len(offsets) == 7

    too_few = spec_for(model={"task": "classification", "num_labels": 2})
    with pytest.raises(DataFormatError, match=r"3 distinct labels but model\.num_labels is 2"):
        prepare(too_few, source, tmp_path / "work2")


def test_prepare_needs_two_documents(tmp_path: Path) -> None:
    source = write(tmp_path / "one.txt", "only one paragraph\nstill the same one\n")
    with pytest.raises(DataFormatError, match="at least 2 documents"):
        prepare(spec_for(), source, tmp_path / "work")


# --------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------


def prepared_corpus(tmp_path: Path) -> PreparedData:
    return prepare(spec_for(), corpus_file(tmp_path), tmp_path / "work")


def test_causal_batches_cover_every_window_once_per_epoch(tmp_path: Path) -> None:
    prepared = prepared_corpus(tmp_path)
    stream = prepared.tokens("train")
    batches = Batches(prepared, "train", batch_size=5, seq_len=16, seed=3)
    n = batches.num_examples
    assert n == -(-len(stream) // 16)
    seen: list[list[int]] = []
    while batches.epoch == 0:
        batch = next(batches)
        assert batch.input_ids.shape == (5, 16) and batch.input_ids.dtype == torch.int64
        assert batch.attention_mask is None
        real = batch.labels != -100
        assert torch.equal(batch.labels[real], batch.input_ids[real])  # labels = inputs; the model shifts
        assert bool((batch.input_ids[~real] == prepared.pad_id).all())
        seen.extend(batch.input_ids[i].tolist() for i in range(5))
    windows = [stream[i * 16 : (i + 1) * 16].tolist() for i in range(n)]
    padded = [w + [prepared.pad_id] * (16 - len(w)) for w in windows]
    first_epoch = seen[:n]
    assert sorted(first_epoch) == sorted(padded)  # every window exactly once
    assert first_epoch != padded  # shuffled


def test_batches_are_deterministic_and_seeded(tmp_path: Path) -> None:
    prepared = prepared_corpus(tmp_path)
    a = [next(Batches(prepared, "train", 4, 16, seed=1)).input_ids for _ in range(1)]
    one, two = Batches(prepared, "train", 4, 16, seed=1), Batches(prepared, "train", 4, 16, seed=1)
    other = Batches(prepared, "train", 4, 16, seed=2)
    xs = [next(one).input_ids for _ in range(30)]
    assert all(torch.equal(x, next(two).input_ids) for x in xs)
    assert torch.equal(a[0], xs[0])
    assert not all(torch.equal(x, next(other).input_ids) for x in xs)


def test_cursor_restores_the_exact_next_batch(tmp_path: Path) -> None:
    prepared = prepared_corpus(tmp_path)
    original = Batches(prepared, "train", 7, 16, seed=5)
    for _ in range(11):  # crosses an epoch boundary (the epoch has fewer than 77 windows)
        next(original)
    state = json.loads(json.dumps(original.state_dict()))  # as stored in a checkpoint
    assert state["epoch"] >= 1 and state["batches_drawn"] == 11
    restored = Batches(prepared, "train", 7, 16, seed=5)
    restored.load_state_dict(state)
    for _ in range(15):
        x, y = next(original), next(restored)
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
    assert restored.batches_drawn == original.batches_drawn == 26

    with pytest.raises(ValueError, match="seed"):
        Batches(prepared, "train", 7, 16, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        Batches(prepared, "train", 7, 8, seed=5).load_state_dict(state)


def test_classification_batches_pad_right_with_eos_and_mask(tmp_path: Path) -> None:
    rows = [{"text": "x" * (i * 5), "label": i % 2} for i in range(20)]
    source = write(tmp_path / "c.jsonl", jsonl(rows))
    spec = spec_for(model={"task": "classification", "num_labels": 2})
    prepared = prepare(spec, source, tmp_path / "work")
    batches = Batches(prepared, "train", 16, 16, seed=0, shuffle=False)
    batch = next(batches)
    assert batch.input_ids.shape == (16, 16) and batch.labels.shape == (16,)
    assert batch.attention_mask is not None
    lengths = batch.attention_mask.sum(dim=1)
    for row in range(16):
        n = int(lengths[row])
        assert bool(batch.attention_mask[row, :n].all()) and not bool(batch.attention_mask[row, n:].any())
        assert int(batch.input_ids[row, n - 1]) == prepared.eos_id  # every example ends with <eos>
        assert bool((batch.input_ids[row, n:] == prepared.pad_id).all())
    assert int(lengths.max()) == 16  # long examples are truncated to seq_len (15 tokens + <eos>)
    assert torch.equal(batch.labels, torch.tensor(prepared.label_ids("train")[:16].tolist()))


def test_eval_batches_are_fixed_and_never_repeat(tmp_path: Path) -> None:
    prepared = prepared_corpus(tmp_path)
    n = Batches(prepared, "val", 1, 16, seed=0).num_examples
    first = list(eval_batches(prepared, "val", 4, 16, max_batches=100))
    assert sum(b.input_ids.shape[0] for b in first) == n  # each window once, last batch smaller
    second = list(eval_batches(prepared, "val", 4, 16, max_batches=2))
    assert len(second) == 2 and all(
        torch.equal(a.input_ids, b.input_ids) for a, b in zip(first[:2], second, strict=True)
    )
