"""Tests of the evaluation report, the metrics and the playground functions (workers/engine/evaluate.py).

The checkpoints are real: ``train()`` runs a few steps of a tiny MoE (tests/engine/tiny.py's, with 8 routed experts
+ 1 shared: hidden 32, 2 layers, top-2, seq 32) on its patterned byte corpus (60 consecutive letters of the cycle
a..p per document), once for causal_lm and once for classification (label: does the document start in a..h or in
i..p).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.specs import merged, merged_spec
from tests.engine.tiny import LETTERS, TINY, write_letters_corpus
from workers.engine import allocator
from workers.engine import evaluate as evaluate_module
from workers.engine.checkpoint import CheckpointError
from workers.engine.data import PreparedData, build_byte_tokenizer, eval_batches
from workers.engine.evaluate import (
    Inference,
    _decode_stream,
    bleu4,
    classification_metrics,
    classify,
    evaluate,
    load_for_inference,
    metric_level,
    rouge_l,
    routing_statistics,
    stream_generate,
)
from workers.engine.generation import generate
from workers.engine.sinks import MemorySink
from workers.engine.spec import Spec
from workers.engine.train import TrainResult, train

# The engine tests' tiny model with 8 routed experts + 1 shared, trained for 6 steps.
BASE = merged(
    TINY,
    model={"moe": {"num_routed_experts": 8, "num_shared_experts": 1, "expert_hidden_size": 16}},
    training={"max_steps": 6, "eval_interval": 6, "checkpoint_interval": 6, "schedule": {"warmup_steps": 1}, "seed": 5},
)


def make_spec(**sections: dict[str, Any]) -> Spec:
    return merged_spec(BASE, **sections)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, MemorySink, TrainResult]:
    """(run dir, source file, sink, result) of a finished 6-step causal_lm run."""
    root = tmp_path_factory.mktemp("causal")
    source = write_letters_corpus(root / "letters.jsonl")
    sink = MemorySink()
    result = train(make_spec(), source, root / "run", sink)
    assert result.status == "completed" and result.checkpoint is not None
    return root / "run", source, sink, result


@pytest.fixture(scope="module")
def class_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MemorySink, TrainResult]:
    root = tmp_path_factory.mktemp("classes")
    source = write_letters_corpus(root / "labelled.jsonl", labelled=True)
    spec = make_spec(model={"task": "classification", "num_labels": 3})  # one slot more than the data uses
    sink = MemorySink()
    result = train(spec, source, root / "run", sink)
    assert result.status == "completed" and result.checkpoint is not None
    return root / "run", sink, result


@pytest.fixture(scope="module")
def causal(causal_run: tuple[Path, Path, MemorySink, TrainResult]) -> Inference:
    checkpoint = causal_run[3].checkpoint
    assert checkpoint is not None
    return load_for_inference(checkpoint)


# --------------------------------------------------------------------------------------------------------
# Metrics against known values
# --------------------------------------------------------------------------------------------------------


def test_bleu4_known_values() -> None:
    assert bleu4(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # By hand: clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu4(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-6)
    assert bleu4(["zebra"], ["the cat sat on the mat"]) == pytest.approx(0.0, abs=1e-9)
    # Text without spaces is one word, so it has no word 4-gram at all; over characters it has many.
    assert bleu4(["abcdefgh"], ["abcdefgh"]) == pytest.approx(0.0, abs=1e-9)
    assert bleu4(["abcdefgh"], ["abcdefgh"], level="char") == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 references"):
        bleu4(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no hypotheses"):
        bleu4([], [])


def test_rouge_l_known_values() -> None:
    assert rouge_l(["The cat sat."], ["the cat sat"]) == pytest.approx(1.0)  # case and punctuation ignored
    # By hand: LCS("a b c d", "a c e") = "a c": P = 2/4, R = 2/3, F = 2PR / (P + R) = 4/7.
    assert rouge_l(["a b c d"], ["a c e"]) == pytest.approx(4 / 7)
    # The mean over pairs: LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 words each side.
    assert rouge_l(["a b c d", "the cat sat on the mat"], ["a c e", "the cat is on the mat"]) == pytest.approx(
        (4 / 7 + 5 / 6) / 2
    )
    # Non-ASCII words count (rouge-score's default tokenizer would drop them all and score 0).
    assert rouge_l(["добрый день"], ["добрый вечер"]) == pytest.approx(0.5)
    assert rouge_l([""], ["something"]) == 0.0
    # Over characters: LCS("abcd", "acbd") has 3 characters (e.g. "abd"): P = R = F = 3/4.
    assert rouge_l(["abcd"], ["a c b d"], level="char") == pytest.approx(0.75)


def test_metric_level_follows_the_references() -> None:
    assert metric_level(["the cat sat on the mat", "a dog ran far away"]) == "word"
    assert metric_level(["abcdefghij", "我们今天去公园"]) == "char"


def test_classification_metrics_hand_computed() -> None:
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    got = classification_metrics(y_true, y_pred, 3)
    assert got["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # rows: true labels
    assert got["accuracy"] == pytest.approx(3 / 5)
    # F1 per label: 0 -> P 1/2, R 1/2 -> 1/2; 1 -> P 2/3, R 1 -> 4/5; 2 -> never predicted -> 0.
    assert got["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # A label slot that neither side uses does not change the mean.
    wider = classification_metrics(y_true, y_pred, 4)
    assert wider["macro_f1"] == pytest.approx(got["macro_f1"]) and len(wider["confusion"]) == 4
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        classification_metrics([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="2 true labels but 1 predictions"):
        classification_metrics([0, 1], [0], 3)


def test_routing_statistics_hand_computed() -> None:
    stats = routing_statistics([[50, 50, 0, 0], [25, 25, 25, 25], [97, 1, 1, 1]], [1, 2, 3])
    assert stats["load"][0] == [0.5, 0.5, 0.0, 0.0]
    assert stats["entropy"][0] == pytest.approx(math.log(2) / math.log(4))  # = 0.5
    assert stats["entropy"][1] == pytest.approx(1.0)
    assert stats["max_over_mean"] == pytest.approx([2.0, 1.0, 3.88])
    assert stats["dead_threshold"] == pytest.approx(0.1 / 4)
    # Layer 3: 1 % of the assignments is under 10 % of the fair share (2.5 %): dead too, not only zeros.
    assert stats["dead_experts"] == [
        {"layer": 1, "experts": [2, 3]},
        {"layer": 2, "experts": []},
        {"layer": 3, "experts": [1, 2, 3]},
    ]
    assert stats["assignments"] == [100, 100, 100]
    # A model whose blocks are all dense has no MoE layer to describe.
    empty = routing_statistics(torch.zeros(0, 8, dtype=torch.int64).numpy(), [])
    assert empty["layers"] == [] and empty["load"] == [] and empty["num_experts"] == 8
    with pytest.raises(ValueError, match="2 rows of counts for 1 layers"):
        routing_statistics([[1, 2], [3, 4]], [0])


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def test_load_for_inference(causal_run: tuple[Path, Path, MemorySink, TrainResult], tmp_path: Path) -> None:
    run, _, _, result = causal_run
    assert result.checkpoint is not None
    inference = load_for_inference(result.checkpoint)
    assert inference.step == 6 and not inference.model.training and inference.labels is None
    weights = result.checkpoint / "model.safetensors"
    assert inference.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert inference.tokenizer.to_str() == PreparedData.load(run / "data").tokenizer().to_str()
    # The tokenizer is found through the run layout; a lone checkpoint directory has none.
    lone = tmp_path / "elsewhere" / "checkpoints" / result.checkpoint.name
    shutil.copytree(result.checkpoint, lone)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_for_inference(lone)
    assert load_for_inference(lone, data_dir=run / "data").sha256 == inference.sha256
    # Altered weights are refused rather than evaluated.
    data = bytearray((lone / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (lone / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_for_inference(lone, data_dir=run / "data")


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------


def test_evaluate_causal_lm(causal_run: tuple[Path, Path, MemorySink, TrainResult]) -> None:
    run, source, sink, result = causal_run
    assert result.checkpoint is not None
    spec = make_spec()
    t = spec.training
    # The trainer's own final evaluation covers eval_batches batches: the same examples give the same loss.
    report = evaluate(result.checkpoint, run / "data", max_examples=t.eval_batches * t.batch_size, prompts=4)
    json.dumps(report, allow_nan=False)  # JSON-able, strictly
    metrics = report["metrics"]
    assert metrics["val_loss"] == pytest.approx(dict(sink.series("val_loss"))[6], rel=1e-6)
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_examples"] == 16
    # Validation takes the loss without building logits (kernels.head_loss): it equals the cross-entropy of the
    # model's logits over the same batches, token-weighted.
    model, total, predicted = load_for_inference(result.checkpoint).model, 0.0, 0
    with torch.no_grad():
        for b in eval_batches(PreparedData.load(run / "data"), "val", t.batch_size, spec.data.seq_len, 2):
            logits = model(b.input_ids).logits
            assert logits is not None
            targets = torch.nn.functional.pad(b.labels[:, 1:], (0, 1), value=-100).reshape(-1)
            flat = logits.reshape(-1, logits.shape[-1])
            total += float(torch.nn.functional.cross_entropy(flat, targets, ignore_index=-100, reduction="sum"))
            predicted += int((targets != -100).sum())
    assert metrics["val_loss"] == pytest.approx(total / predicted, rel=1e-5)
    assert 0.0 <= metrics["bleu4"] <= 100.0 and 0.0 <= metrics["rouge_l"] <= 1.0
    assert (
        report["checkpoint"]["step"] == 6
        and report["checkpoint"]["sha256"] == load_for_inference(result.checkpoint).sha256
    )
    assert report["spec"] == spec.model_dump(mode="json")

    samples = report["samples"]
    assert len(samples) == 4
    for sample in samples:
        assert sample["prompt"] and sample["reference"]
        assert set(sample["prompt"] + sample["reference"]) <= set(LETTERS)
        # A held-out document is a run of consecutive letters: the reference continues the prompt.
        assert LETTERS.index(sample["reference"][0]) == (LETTERS.index(sample["prompt"][-1]) + 1) % 16
        assert len(sample["prompt"]) == len(sample["reference"]) == 30  # a 60-letter document cut in half
    # Documents without spaces are one "word" each: BLEU-4 and ROUGE-L are then taken over characters.
    assert report["settings"]["metric_level"] == "char"
    outputs, references = [s["output"] for s in samples], [s["reference"] for s in samples]
    assert metrics["bleu4"] == pytest.approx(bleu4(outputs, references, level="char"))
    assert metrics["rouge_l"] == pytest.approx(rouge_l(outputs, references, level="char"))

    routing = report["routing"]
    assert routing["layers"] == [0, 1] and routing["num_experts"] == 8
    real_tokens = sum(
        int((b.labels != -100).sum()) for b in eval_batches(PreparedData.load(run / "data"), "val", 8, 32, 2)
    )
    assert routing["assignments"] == [real_tokens * 2, real_tokens * 2]  # top-2, real tokens only
    for row in routing["load"]:
        assert sum(row) == pytest.approx(1.0)
    assert all(0.0 <= h <= 1.0 for h in routing["entropy"])

    # What generation caches per token: keys and values of 2 heads of 16 in 2 layers, fp32.
    assert report["kv_cache"] == {"attention": "mha", "bytes_per_token": 512, "bytes_per_token_mha": 512}
    assert "val_mtp_loss" not in metrics

    # Deterministic, and the source file resolves to the run's own preparation.
    again = evaluate(result.checkpoint, source, max_examples=16, prompts=4)
    assert again == report


def test_evaluate_reports_the_mtp_loss_and_the_compressed_cache(tmp_path: Path) -> None:
    source = write_letters_corpus(tmp_path / "letters.jsonl")
    mla = {"kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
    spec = make_spec(model={"attention": "mla", "mla": mla, "mtp_depth": 1}, training={"max_steps": 2})
    sink = MemorySink()
    result = train(spec, source, tmp_path / "run", sink)
    assert result.checkpoint is not None
    report = evaluate(result.checkpoint, tmp_path / "run" / "data", max_examples=16, prompts=2)
    json.dumps(report, allow_nan=False)
    assert report["metrics"]["val_mtp_loss"] > 0 and math.isfinite(report["metrics"]["val_mtp_loss"])
    # The latent (8) and the shared rotary key (4) per layer, instead of 2 x 2 heads x 16.
    assert report["kv_cache"] == {"attention": "mla", "bytes_per_token": 2 * 12 * 4, "bytes_per_token_mha": 512}
    assert all(s["output"] is not None for s in report["samples"])  # generation from the compressed cache


def test_evaluate_runs_its_batches_with_freed_memory_kept(
    causal_run: tuple[Path, Path, MemorySink, TrainResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validation forwards run inside ``allocator.keep_freed_memory`` (as training's do), and the block is
    closed again when the report is done."""
    run, _, _, result = causal_run
    assert result.checkpoint is not None
    depths: list[int] = []
    real = evaluate_module.validation_metrics

    def spy(*args: Any, **kwargs: Any) -> Any:
        depths.append(allocator._depth)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "validation_metrics", spy)
    before = allocator._depth
    applies = allocator._glibc() is not None  # off glibc (or ENGINE_KEEP_FREED_MEMORY=0) the block is a no-op
    evaluate(result.checkpoint, run / "data", max_examples=8, prompts=0)
    assert depths == [before + applies] and allocator._depth == before


def test_routing_counts_agree_with_the_models_recorded_load(
    causal_run: tuple[Path, Path, MemorySink, TrainResult],
) -> None:
    run, _, _, result = causal_run
    assert result.checkpoint is not None
    report = evaluate(result.checkpoint, run / "data", max_examples=8, prompts=0)
    assert report["metrics"]["bleu4"] is None and report["samples"] == []
    batch = next(eval_batches(PreparedData.load(run / "data"), "val", 8, 32, 1))
    assert bool((batch.labels != -100).all())  # the first batch has no padding: the model's count is exact
    with torch.no_grad():
        load = load_for_inference(result.checkpoint).model(batch.input_ids).expert_load  # (layers, E)
    torch.testing.assert_close(torch.tensor(report["routing"]["load"], dtype=torch.float32), load)


def test_evaluate_classification(class_run: tuple[Path, MemorySink, TrainResult]) -> None:
    run, sink, result = class_run
    assert result.checkpoint is not None
    report = evaluate(result.checkpoint, run / "data", max_examples=16, prompts=3)
    json.dumps(report, allow_nan=False)
    metrics = report["metrics"]
    assert metrics["accuracy"] == pytest.approx(dict(sink.series("val_accuracy"))[6])
    assert metrics["val_loss"] == pytest.approx(dict(sink.series("val_loss"))[6], rel=1e-6)
    assert 0.0 <= metrics["macro_f1"] <= 1.0
    labels = report["classification"]["labels"]
    assert labels == ["early", "late", "<unused 2>"]
    confusion = report["classification"]["confusion"]
    assert sum(map(sum, confusion)) == metrics["val_examples"] == 16
    assert metrics["accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / 16)
    assert len(report["samples"]) == 3
    inference = load_for_inference(result.checkpoint)
    for sample in report["samples"]:
        assert sample["label"] in ("early", "late") and len(sample["text"]) == 31  # seq_len - 1 tokens
        assert sum(sample["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        # The playground classifies a text exactly as the evaluation did.
        ranked = classify(inference, sample["text"])
        assert ranked[0][0] == sample["predicted"]
        assert dict(ranked)[sample["predicted"]] == pytest.approx(
            sample["probabilities"][sample["predicted"]], abs=1e-5
        )
    # Routing counts real tokens only: 31 letters + <eos> per example, top-2.
    assert report["routing"]["assignments"] == [16 * 32 * 2] * 2


def test_evaluate_prepares_another_file_with_the_runs_settings(
    causal_run: tuple[Path, Path, MemorySink, TrainResult], tmp_path: Path
) -> None:
    run, _, _, result = causal_run
    assert result.checkpoint is not None
    # Documents of the reversed cycle: not the run's file, so it is prepared aside with the spec's settings.
    other = tmp_path / "reversed.jsonl"
    with open(other, "w") as f:
        for start in range(40):
            f.write(json.dumps({"text": "".join(LETTERS[(start - j) % 16] for j in range(60))}) + "\n")
    report = evaluate(result.checkpoint, other, max_examples=8, prompts=2)
    own = evaluate(result.checkpoint, run / "data", max_examples=8, prompts=2)
    assert report["metrics"]["val_loss"] != own["metrics"]["val_loss"]
    for sample in report["samples"]:  # held-out documents of the other file
        assert LETTERS.index(sample["reference"][0]) == (LETTERS.index(sample["prompt"][-1]) - 1) % 16
    assert not list(run.glob("evaluate-*")) and (run / "data" / "COMPLETE").is_file()  # the run's data untouched


def test_evaluate_rejects_bad_arguments(causal_run: tuple[Path, Path, MemorySink, TrainResult]) -> None:
    run, _, _, result = causal_run
    assert result.checkpoint is not None
    with pytest.raises(ValueError, match="max_examples"):
        evaluate(result.checkpoint, run / "data", max_examples=0)
    with pytest.raises(ValueError, match="prompts"):
        evaluate(result.checkpoint, run / "data", prompts=-1)


# --------------------------------------------------------------------------------------------------------
# Playground
# --------------------------------------------------------------------------------------------------------


def test_stream_generate_yields_the_greedy_continuation(causal: Inference) -> None:
    prompt = "abcdef"
    pieces = list(stream_generate(causal, prompt, max_new_tokens=12, temperature=0.0))
    assert len(pieces) >= 2  # streamed, not one final string
    ids = torch.tensor([[causal.eos_id, *causal.tokenizer.encode(prompt).ids]])
    full = generate(causal.model, ids, 12, temperature=0.0, eos_id=causal.eos_id)[0, ids.shape[1] :].tolist()
    if causal.eos_id in full:
        full = full[: full.index(causal.eos_id)]
    assert "".join(pieces) == causal.tokenizer.decode(full)
    assert not causal.model.training


def test_stream_generate_seeded_sampling_is_reproducible(causal: Inference) -> None:
    def sample(seed: int) -> str:
        return "".join(
            stream_generate(causal, "ghij", max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95, seed=seed)
        )

    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1  # the seed matters at a high temperature


def test_stream_generate_says_whether_the_model_or_the_limit_ended_the_text(causal: Inference) -> None:
    """``ended`` agrees with ``generate`` on the same seeds: ``eos`` exactly when the reference produced
    ``<eos>`` (the text before it, possibly none, is what was streamed), ``max_tokens`` otherwise."""
    ids = torch.tensor([[causal.eos_id, *causal.tokenizer.encode("abc", add_special_tokens=False).ids]])
    seen: set[str] = set()
    for seed in range(40):
        stream = stream_generate(causal, "abc", max_new_tokens=24, temperature=2.0, seed=seed)
        assert stream.ended is None  # nothing generated yet
        text = "".join(stream)
        reference = generate(
            causal.model, ids, 24, temperature=2.0, eos_id=causal.eos_id, generator=torch.Generator().manual_seed(seed)
        )[0, ids.shape[1] :].tolist()
        expected = "eos" if causal.eos_id in reference else "max_tokens"
        assert stream.ended == expected, seed
        if expected == "eos":
            reference = reference[: reference.index(causal.eos_id)]
        assert text == causal.tokenizer.decode(reference)
        seen.add(expected)
    assert seen == {"eos", "max_tokens"}  # both endings were exercised
    closed = stream_generate(causal, "abc", max_new_tokens=24, temperature=2.0, seed=0)
    next(closed, None)
    closed.close()
    assert closed.ended is None and not causal.model.training


def test_stream_decoding_keeps_multibyte_characters_whole() -> None:
    tokenizer = build_byte_tokenizer()
    fake = Inference(None, None, tokenizer, None, 0, "", Path("."), torch.device("cpu"))  # type: ignore[arg-type]
    ids = tokenizer.encode("né€😀!").ids  # 1 + 2 + 3 + 4 + 1 bytes
    assert list(_decode_stream(fake, iter(ids))) == ["n", "é", "€", "😀", "!"]
    # A character cut off by the last token still arrives (as the replacement character), at the end.
    assert list(_decode_stream(fake, iter(ids[:4]))) == ["n", "é", "\ufffd"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10_000}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 100_000}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
    ],
)
def test_stream_generate_validates_arguments_when_called(causal: Inference, kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        stream_generate(causal, "abc", **kwargs)  # raised at the call, before any token


def test_classify_and_generate_refuse_the_other_task(
    causal: Inference, class_run: tuple[Path, MemorySink, TrainResult]
) -> None:
    checkpoint = class_run[2].checkpoint
    assert checkpoint is not None
    classifier = load_for_inference(checkpoint)
    ranked = classify(classifier, "abcdefgh")
    assert [label for label, _ in ranked] != [] and {label for label, _ in ranked} == {"early", "late", "<unused 2>"}
    probabilities = [p for _, p in ranked]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="causal_lm"):
        stream_generate(classifier, "abc")
    with pytest.raises(ValueError, match="classification"):
        classify(causal, "abc")
