"""Evaluation of a trained checkpoint: metrics for the report, and the playground's generation and classification.

- ``load_for_inference(checkpoint_dir)`` -> ``Inference``: the verified checkpoint's model (eval mode), spec,
  the tokenizer its run trained with, label names, step and the SHA-256 of its weights.
- ``evaluate(checkpoint_dir, data_path)`` -> a JSON-able report (see its docstring): validation loss and
  perplexity on the run's validation split (``train.validation_metrics``, the trainer's own evaluation),
  BLEU-4 / ROUGE-L of greedy continuations of held-out documents (causal_lm) or accuracy / macro-F1 /
  confusion matrix (classification), samples, and routing statistics.
- ``stream_generate(inference, prompt, ...)`` yields decoded text pieces as tokens are produced;
  ``classify(inference, text)`` returns ``[(label, probability)]``, most probable first.
- ``bleu4``, ``rouge_l``, ``classification_metrics``, ``routing_statistics``: the metrics, as pure functions.

Where the run's files are: a checkpoint is ``<run>/checkpoints/step-000123/`` and the data its run prepared is
``<run>/data/`` (``tokenizer.json``, ``labels.json``), see ``train.py``. A ``tokenizer.json``/``labels.json``
inside the checkpoint directory itself, or in an explicit ``data_dir``, takes precedence.

Prompts are read as the start of a document: they are preceded by ``<eos>``, as every document but the
first is in training (``prepare`` concatenates documents, each followed by ``<eos>``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from workers.engine.allocator import keep_freed_memory
from workers.engine.checkpoint import checkpoint_spec, load_checkpoint, verify_checkpoint
from workers.engine.data import (
    IGNORE_INDEX,
    Batch,
    Label,
    PreparedData,
    _sha256_file,
    detect_format,
    load_tokenizer,
    preparation_settings,
    prepare,
)
from workers.engine.estimate import kv_cache_bytes_per_token
from workers.engine.generation import generate_tokens
from workers.engine.layout import RunLayout
from workers.engine.model import ModelOutput, MoEFeedForward, MoETransformer, build_model
from workers.engine.spec import Spec, load_spec
from workers.engine.train import (
    EngineConfigError,
    _check_data_fits,
    autocast_context,
    resolve_device,
    validation_metrics,
)

MetricLevel = Literal["word", "char"]

# An expert whose share of a layer's assignments is below this fraction of the uniform share (1/E) counts as
# dead: at 10 % of its fair share it is trained and used so little that it is effectively wasted capacity.
DEAD_EXPERT_FRACTION = 0.1
MAX_NEW_TOKENS = 1024  # the playground's upper bound for one request
MAX_TEMPERATURE = 5.0


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


@dataclass
class Inference:
    """A checkpoint ready for inference. ``labels[i]`` names logit ``i`` (classification; None otherwise)."""

    model: MoETransformer  # in eval mode, on ``device``
    spec: Spec
    tokenizer: Tokenizer  # the run's tokenizer, with encode_special_tokens on
    labels: list[Label] | None
    step: int
    sha256: str  # of the checkpoint's model.safetensors
    checkpoint: Path
    device: torch.device

    @property
    def eos_id(self) -> int:
        return _token_id(self.tokenizer, "<eos>")


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {token} token")
    return int(token_id)


def _candidate_dirs(checkpoint: Path, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Where a run's tokenizer and labels may be, in order of precedence."""
    found = [] if data_dir is None else [Path(data_dir)]
    return [*found, checkpoint, RunLayout.of_checkpoint(checkpoint).prepared_data]


def _find_run_file(checkpoint: Path, data_dir: str | os.PathLike[str] | None, name: str) -> Path | None:
    for folder in _candidate_dirs(checkpoint, data_dir):
        if (folder / name).is_file():
            return folder / name
    return None


def load_for_inference(
    checkpoint_dir: str | os.PathLike[str], device: str = "cpu", *, data_dir: str | os.PathLike[str] | None = None
) -> Inference:
    """Load a checkpoint for inference, after verifying every file against its manifest.

    The tokenizer (and, for classification, ``labels.json``) is looked up in ``data_dir``, then the checkpoint
    directory, then ``<run>/data``. Raises ``CheckpointError`` for a checkpoint that does not verify and
    ``FileNotFoundError`` when the tokenizer or the labels cannot be found.
    """
    root = Path(checkpoint_dir)
    manifest = verify_checkpoint(root, check_hashes=True)  # a report must never describe altered weights
    spec = load_spec(checkpoint_spec(root))
    dev = resolve_device(device)
    model = build_model(spec).to(dev)
    loaded = load_checkpoint(root, model=model, restore_rng=False, verify=False)
    model.eval()

    tokenizer_path = _find_run_file(root, data_dir, "tokenizer.json")
    if tokenizer_path is None:
        places = ", ".join(str(p) for p in _candidate_dirs(root, data_dir))
        raise FileNotFoundError(f"no tokenizer.json for {root} (looked in {places})")
    labels: list[Label] | None = None
    if spec.model.task == "classification":
        labels_path = _find_run_file(root, data_dir, "labels.json")
        if labels_path is None:
            raise FileNotFoundError(f"no labels.json for the classification checkpoint {root}")
        known: list[Label] = json.loads(labels_path.read_text())
        num_labels = spec.model.num_labels or 0
        # The spec may reserve more label slots than the data used; those logits were never a target.
        labels = [*known, *(f"<unused {i}>" for i in range(len(known), num_labels))]
    return Inference(
        model=model,
        spec=spec,
        tokenizer=load_tokenizer(tokenizer_path),
        labels=labels,
        step=loaded.step,
        sha256=str(manifest["files"]["model.safetensors"]["sha256"]),
        checkpoint=root,
        device=dev,
    )


# --------------------------------------------------------------------------------------------------------
# Metrics (pure functions)
# --------------------------------------------------------------------------------------------------------


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses to score")


def bleu4(hypotheses: Sequence[str], references: Sequence[str], *, level: MetricLevel = "word") -> float:
    """Corpus BLEU-4 of ``hypotheses`` against one reference each, in 0..100.

    sacrebleu's defaults (exponential smoothing, brevity penalty over the corpus) with its ``13a`` word
    tokenization (``level="word"``, comparable with published sacreBLEU scores) or its ``char`` tokenization
    (``level="char"``: for text without spaces, where words give no 4-grams). Raises ``ValueError`` for empty
    or unequal lists.
    """
    _check_pairs(hypotheses, references)
    bleu = BLEU(tokenize="13a" if level == "word" else "char")
    return float(bleu.corpus_score(list(hypotheses), [list(references)]).score)


class _WordTokenizer:
    """rouge-score's default tokenization (lower-case, runs of letters and digits) extended to non-ASCII
    letters and digits: the default keeps only ``[a-z0-9]``, so any non-English text would score 0."""

    _WORD = re.compile(r"[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return self._WORD.findall(text.lower())


class _CharTokenizer:
    """Lower-cased characters, whitespace left out: ROUGE-L over characters for text without spaces."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text.lower() if not c.isspace()]


def rouge_l(hypotheses: Sequence[str], references: Sequence[str], *, level: MetricLevel = "word") -> float:
    """Mean ROUGE-L F-measure (longest common subsequence, ``2PR / (P + R)``) over the pairs, in 0..1.

    rouge-score without stemming, over words (``level="word"``: as its default tokenizer finds them on ASCII
    text, see ``_WordTokenizer`` for other scripts) or over non-space characters (``level="char"``). A pair
    where either side is empty scores 0. Raises ``ValueError`` for empty or unequal lists.
    """
    _check_pairs(hypotheses, references)
    tokenizer = _WordTokenizer() if level == "word" else _CharTokenizer()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=tokenizer)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)]
    return float(np.mean(scores))


def metric_level(references: Sequence[str]) -> MetricLevel:
    """``"word"``, unless the references average fewer than 4 words (BLEU-4 then has almost no 4-gram to
    match: text without spaces such as Chinese, Japanese, or identifiers), then ``"char"``."""
    words = [len(_WordTokenizer().tokenize(r)) for r in references]
    return "word" if words and float(np.mean(words)) >= 4 else "char"


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict[str, Any]:
    """``{"accuracy", "macro_f1", "confusion"}`` of predicted label ids against true ones.

    ``confusion[t][p]`` counts examples of true label ``t`` predicted as ``p`` (``num_labels`` × ``num_labels``).
    Macro-F1 is the unweighted mean F1 over the labels that occur in ``y_true`` or ``y_pred`` (scikit-learn's
    default): a label slot the data never uses does not drag the mean down. A label with no true and no
    predicted example is skipped; precision or recall with a zero denominator counts as 0.
    Raises ``ValueError`` for empty or unequal inputs, or ids outside ``0..num_labels-1``.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("no examples to score")
    if num_labels < 1:
        raise ValueError("num_labels must be at least 1")
    true, pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    for name, ids in (("y_true", true), ("y_pred", pred)):
        if ids.min() < 0 or ids.max() >= num_labels:
            raise ValueError(f"{name} holds label ids outside 0..{num_labels - 1}")
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (predicted + actual) > 0
    return {
        "accuracy": float(tp.sum() / len(true)),
        "macro_f1": float(f1[present].mean()),
        "confusion": confusion.tolist(),
    }


def routing_statistics(
    counts: Sequence[Sequence[int]] | np.ndarray, layers: Sequence[int], *, dead_fraction: float = DEAD_EXPERT_FRACTION
) -> dict[str, Any]:
    """Summaries of routed-expert assignment ``counts`` ``(num_moe_layers, E)``; ``layers`` are block indices.

    - ``load``: each layer's fractions of its assignments per expert (a row sums to 1; all 0 without tokens);
    - ``dead_experts``: ``[{"layer", "experts"}]``, the experts whose load is below ``dead_threshold`` =
      ``dead_fraction / E`` (so an expert with no token at all is always dead);
    - ``entropy``: per layer, the entropy of the load divided by ``log E``, in 0..1 (1: perfectly balanced;
      defined as 1 for a single expert, 0 for a layer without tokens);
    - ``max_over_mean``: per layer, the largest load over the mean load ``1/E`` (1: balanced, E: one expert
      takes everything);
    - ``assignments``: per layer, the number of (token, expert) assignments counted.
    """
    table = np.asarray(counts, dtype=np.float64)
    if table.ndim != 2:  # a plain empty list: a model without MoE layers
        table = table.reshape(len(layers), -1) if table.size else np.zeros((len(layers), 0))
    if table.shape[0] != len(layers):
        raise ValueError(f"{table.shape[0]} rows of counts for {len(layers)} layers")
    E = table.shape[1]
    totals = table.sum(axis=1, keepdims=True)
    load = np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)
    threshold = dead_fraction / E if E else 0.0
    entropy, ratio, dead = [], [], []
    for layer, row, total in zip(layers, load, totals[:, 0], strict=True):
        nonzero = row[row > 0]
        h = float(-(nonzero * np.log(nonzero)).sum())
        entropy.append(0.0 if total == 0 else (1.0 if E == 1 else h / math.log(E)))
        ratio.append(float(row.max() * E))
        dead.append({"layer": int(layer), "experts": [int(e) for e in np.flatnonzero(row < threshold)]})
    return {
        "layers": [int(x) for x in layers],
        "num_experts": E,
        "assignments": [int(t) for t in totals[:, 0]],
        "load": load.tolist(),
        "dead_threshold": threshold,
        "dead_experts": dead,
        "entropy": entropy,
        "max_over_mean": ratio,
    }


# --------------------------------------------------------------------------------------------------------
# Playground: streaming generation and classification
# --------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_float(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        opening = "(" if low_open else "["
        raise ValueError(f"{name} must be in {opening}{low}, {high}], got {value}")
    return float(value)


def _prompt_ids(inference: Inference, prompt: str) -> torch.Tensor:
    """``(1, T)``: ``<eos>`` (a document starts after it) then the prompt's tokens."""
    ids = [inference.eos_id, *inference.tokenizer.encode(prompt, add_special_tokens=False).ids]
    return torch.tensor([ids], dtype=torch.long, device=inference.device)


class TextStream(Iterator[str]):
    """The pieces of text that ``stream_generate`` yields, and once it is exhausted why generation ended.

    ``ended`` is ``"eos"`` (the model produced ``<eos>``), ``"max_tokens"`` (it produced ``max_new_tokens``
    tokens) or ``None`` (not exhausted yet, or closed early). ``close()`` ends generation after the current
    token and restores the model's mode.
    """

    def __init__(self, pieces: Generator[str, None, None], outcome: dict[str, str]) -> None:
        self._pieces = pieces
        self._outcome = outcome

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def ended(self) -> str | None:
        return self._outcome.get("ended")

    def close(self) -> None:
        self._pieces.close()


def _token_stream(
    inference: Inference,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    outcome: dict[str, str],
) -> Iterator[int]:
    """The generated token ids of one prompt, ending before ``<eos>`` (which is not yielded). Once exhausted,
    ``outcome["ended"]`` says why: ``"eos"`` or ``"max_tokens"``."""
    eos = inference.eos_id
    steps = generate_tokens(
        inference.model, _prompt_ids(inference, prompt), max_new_tokens, temperature, top_k, top_p, eos, generator
    )
    with contextlib.closing(steps):  # stopping early must still restore the model's mode
        for nxt in steps:
            token = int(nxt[0])
            if token == eos:
                outcome["ended"] = "eos"
                return
            yield token
    outcome["ended"] = "max_tokens"


def stream_generate(
    inference: Inference,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> TextStream:
    """Generate a continuation of ``prompt``, yielding decoded text pieces as tokens are produced (a
    ``TextStream``: once exhausted, its ``ended`` says whether the model ended the text or the limit did).

    Arguments are checked when this is called (not at the first ``next``); a ``ValueError`` names the bad one:
    ``max_new_tokens`` in 1..``MAX_NEW_TOKENS``, ``temperature`` in [0, ``MAX_TEMPERATURE``] (0: greedy),
    ``top_k`` None or 1..vocab_size, ``top_p`` None or in (0, 1], ``seed`` None or a non-negative integer (the
    same seed and arguments give the same text). Generation stops at ``<eos>`` or after ``max_new_tokens``.

    Pieces are cut at UTF-8 character boundaries (``tokenizers.decoders.DecodeStream``): a character whose
    bytes span several tokens arrives whole, once its last token is produced; a character left incomplete by
    the last token arrives at the end as the replacement character. ``"".join`` of the pieces is the decoded
    continuation. Special tokens are not shown.
    """
    if inference.spec.model.task != "causal_lm":
        raise ValueError("stream_generate needs a causal_lm checkpoint")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    _check_int("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    temperature = _check_float("temperature", temperature, 0.0, MAX_TEMPERATURE)
    if top_k is not None:
        _check_int("top_k", top_k, 1, inference.spec.model.vocab_size)
    if top_p is not None:
        top_p = _check_float("top_p", top_p, 0.0, 1.0, low_open=True)
    generator = None
    if seed is not None:
        _check_int("seed", seed, 0, 2**63 - 1)
        generator = torch.Generator(device=inference.device).manual_seed(seed)
    outcome: dict[str, str] = {}
    tokens = _token_stream(inference, prompt, max_new_tokens, temperature, top_k, top_p, generator, outcome)
    return TextStream(_decode_stream(inference, tokens), outcome)


def _decode_stream(inference: Inference, tokens: Iterator[int]) -> Generator[str, None, None]:
    decoder = DecodeStream(skip_special_tokens=True)
    produced: list[int] = []
    sent = 0  # characters yielded so far
    for token in tokens:
        produced.append(token)
        piece = decoder.step(inference.tokenizer, token)
        if piece:
            sent += len(piece)
            yield piece
    # DecodeStream holds back an incomplete UTF-8 sequence; at the end it will never complete.
    rest = inference.tokenizer.decode(produced, skip_special_tokens=True)[sent:]
    if rest:
        yield rest


def _classification_ids(inference: Inference, text: str) -> list[int]:
    """The tokens the classifier sees: at most ``seq_len - 1`` tokens of ``text`` then ``<eos>``, whose hidden
    state is pooled (the same rule as ``data``'s classification batches)."""
    ids = inference.tokenizer.encode(text, add_special_tokens=False).ids[: inference.spec.data.seq_len - 1]
    return [*ids, inference.eos_id]


@torch.no_grad()
def classify(inference: Inference, text: str) -> list[tuple[Label, float]]:
    """``[(label, probability)]`` for every label slot of a classification checkpoint, most probable first
    (ties: lower label id first). Probabilities are the softmax of the logits and sum to 1."""
    if inference.spec.model.task != "classification" or inference.labels is None:
        raise ValueError("classify needs a classification checkpoint")
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    ids = torch.tensor([_classification_ids(inference, text)], dtype=torch.long, device=inference.device)
    probs = inference.model(ids).logits.float().softmax(dim=-1)[0].cpu()  # (num_labels,)
    order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))
    return [(inference.labels[i], float(probs[i])) for i in order]


# --------------------------------------------------------------------------------------------------------
# The evaluation report
# --------------------------------------------------------------------------------------------------------


class _RoutingRecorder:
    """Counts the routed experts chosen for the real (non-padding) tokens of each evaluated batch.

    The model's own ``expert_load`` counts every position, padding included (the model routes pads too); a
    classification batch is mostly padding, which would then dominate the statistics. So the MoE layers'
    inputs are kept by forward hooks and routed again, real tokens only, with the layer's own ``route``
    (the same decision the forward made; evaluation never drops tokens, so routed = processed).
    """

    def __init__(self, model: MoETransformer) -> None:
        self.moe: list[tuple[int, MoEFeedForward]] = [
            (i, block.ffn) for i, block in enumerate(model.blocks) if isinstance(block.ffn, MoEFeedForward)
        ]
        E = model.spec.model.moe.num_routed_experts
        self.counts = torch.zeros(len(self.moe), E, dtype=torch.int64)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.moe)
        self.handles = [ffn.register_forward_hook(self._keeper(j)) for j, (_, ffn) in enumerate(self.moe)]

    def _keeper(self, j: int) -> Callable[..., None]:
        def keep(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: object) -> None:
            self.inputs[j] = args[0].detach()  # (B, T, C)

        return keep

    def add(self, real: torch.Tensor) -> None:
        """Count the last forward's routing of the positions where ``real`` ``(B, T)`` is true."""
        E = self.counts.shape[1]
        for j, (_, ffn) in enumerate(self.moe):
            x = self.inputs[j]
            assert x is not None  # the forward ran
            rows = x.reshape(-1, x.shape[-1])[real.reshape(-1).to(x.device)]  # (N_real, C)
            _, _, chosen, _ = ffn.route(rows)
            self.counts[j] += torch.bincount(chosen.reshape(-1), minlength=E).cpu()
            self.inputs[j] = None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def statistics(self) -> dict[str, Any]:
        return routing_statistics(self.counts.numpy(), [i for i, _ in self.moe])


@contextlib.contextmanager
def _prepared_for(inference: Inference, data_path: str | os.PathLike[str]) -> Iterator[PreparedData]:
    """The prepared data to evaluate on, with the run's tokenization and validation split.

    ``data_path`` is a prepared directory (the run's ``<run>/data``), or a source file: then the run's own
    preparation is used when it was made from this very file with the spec's settings, else the file is
    prepared afresh in a temporary directory (the split is a pure function of the spec, so it is the same
    split; the tokenizer must come out identical to the checkpoint's, which is checked).
    """
    path = Path(data_path)
    with contextlib.ExitStack() as stack:
        if path.is_dir():
            prepared = PreparedData.load(path)
        else:
            prepared_or_none = _run_preparation_of(inference, path)
            if prepared_or_none is None:
                scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="evaluate-"))
                prepared_or_none = prepare(inference.spec, path, scratch)
            prepared = prepared_or_none
        _check_data_fits(inference.spec, prepared)
        if prepared.tokenizer().to_str() != inference.tokenizer.to_str():
            raise EngineConfigError(
                f"{path} is tokenized differently from the checkpoint's run: evaluate on the run's prepared data"
            )
        yield prepared


def _run_preparation_of(inference: Inference, source: Path) -> PreparedData | None:
    run_data = RunLayout.of_checkpoint(inference.checkpoint).prepared_data
    try:
        prepared = PreparedData.load(run_data)
    except FileNotFoundError:
        return None
    same_file = prepared.meta["source"]["sha256"] == _sha256_file(source)
    same_settings = prepared.meta["settings"] == preparation_settings(inference.spec, detect_format(source))
    return prepared if same_file and same_settings else None


def _held_out_pairs(
    inference: Inference, prepared: PreparedData, count: int, max_new_tokens: int, seed: int
) -> list[tuple[str, str]]:
    """Up to ``count`` ``(prompt, reference)`` pairs from validation documents picked by a permutation seeded
    with ``seed``.

    A document (its first ``4 * max_seq_len`` tokens, which bounds the work for long ones) is cut near the
    middle of its text, at a space when there is one in the second quarter: the first part is the
    prompt, the next ``max_new_tokens`` tokens of the rest are the reference (the same token budget as the
    continuation, so BLEU's brevity penalty compares like with like). Documents under 2 characters are skipped.
    """
    tokens = prepared.tokens("val")
    eos, tokenizer = prepared.eos_id, inference.tokenizer
    ends = np.flatnonzero(tokens == eos)  # causal_lm: every document is followed by <eos>
    starts = np.concatenate(([0], ends[:-1] + 1))
    cap = 4 * inference.spec.model.max_seq_len
    pairs: list[tuple[str, str]] = []
    for d in np.random.default_rng(seed).permutation(len(ends)):
        if len(pairs) == count:
            break
        start, end = int(starts[d]), int(ends[d])
        text = tokenizer.decode(tokens[start : min(end, start + cap)].tolist(), skip_special_tokens=True)
        if len(text.strip()) < 2:
            continue
        cut = len(text) // 2
        space = text.rfind(" ", len(text) // 4, cut)
        cut = space if space > 0 else cut
        rest_ids = tokenizer.encode(text[cut:], add_special_tokens=False).ids[:max_new_tokens]
        reference = tokenizer.decode(rest_ids, skip_special_tokens=True).rstrip("\ufffd")
        pairs.append((text[:cut], reference))
    return pairs


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evaluate(
    checkpoint_dir: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    max_examples: int = 200,
    prompts: int = 32,
    max_new_tokens: int = 32,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The evaluation report of a checkpoint on its run's validation split: a JSON-able dict.

    Deterministic for the same checkpoint, data, arguments and device: the batches are the first ones of the
    validation split in order, continuations are greedy, and the prompts are picked with ``seed``.

    - ``max_examples``: validation examples (causal_lm: windows of ``data.seq_len`` tokens; classification:
      rows) for the loss, predictions and routing, rounded up to whole batches of ``training.batch_size``;
    - ``prompts``: held-out documents continued for BLEU/ROUGE (causal_lm), or samples shown (classification);
    - ``max_new_tokens``: length of each continuation and of its reference.

    Keys: ``task``, ``checkpoint`` ``{path, step, sha256}``, ``spec``, ``settings`` (the arguments, the
    precision used, ``decoding: "greedy"``), ``metrics`` (``val_loss``, ``val_examples`` and, for causal_lm,
    ``val_ppl`` (None when it overflows), ``bleu4`` (0..100) and ``rouge_l`` (0..1), both None without prompts
    and over words or characters as ``metric_level`` picks from the references (``settings.metric_level``);
    ``val_mtp_loss`` with multi-token prediction (the MTP modules' mean loss over the same batches); for
    classification ``accuracy``, ``macro_f1``), ``samples`` (causal_lm ``[{prompt, reference, output}]``;
    classification ``[{text, label, predicted, probabilities: {label: p}}]``), ``classification`` (``labels``,
    ``confusion`` with rows = true labels; classification only), ``routing`` (``routing_statistics`` over
    the real tokens of the evaluated examples) and, for causal_lm, ``kv_cache`` (what generation caches per
    token in fp32 over all layers: ``attention``, ``bytes_per_token``, and ``bytes_per_token_mha``, what
    multi-head attention with the same heads would cache).
    """
    _check_int("max_examples", max_examples, 1)
    _check_int("prompts", prompts, 0)
    _check_int("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    _check_int("seed", seed, 0)
    inference = load_for_inference(checkpoint_dir, device, data_dir=data_dir)
    spec, model, dev = inference.spec, inference.model, inference.device
    classification = spec.model.task == "classification"
    try:
        autocast = autocast_context(spec, dev)
        precision = spec.training.precision
    except EngineConfigError:
        # fp16 training on CUDA, evaluated on a CPU: fp32 is exact where fp16 cannot run.
        autocast, precision = contextlib.nullcontext, "fp32"

    recorder = _RoutingRecorder(model)
    y_true: list[int] = []
    y_pred: list[int] = []
    rows: list[tuple[list[int], list[float]]] = []  # classification: (tokens, probabilities) per example
    mtp_losses: list[float] = []
    examples = 0

    def on_batch(batch: Batch, out: ModelOutput) -> None:
        nonlocal examples
        examples += batch.input_ids.shape[0]
        if out.mtp_loss is not None:
            mtp_losses.append(float(out.mtp_loss))
        if batch.attention_mask is not None:
            real = batch.attention_mask.bool()
            assert out.logits is not None  # a classifier always returns them
            probs = out.logits.float().softmax(dim=-1).cpu()  # (B, num_labels)
            y_true.extend(int(y) for y in batch.labels)
            y_pred.extend(int(p) for p in probs.argmax(dim=-1))
            for ids, mask, p in zip(batch.input_ids, real, probs, strict=True):
                rows.append((ids[mask].tolist(), p.tolist()))
        else:
            real = batch.labels != IGNORE_INDEX
        recorder.add(real)

    # As training does (workers.engine.allocator): every batch allocates its (B, T, V) logits afresh, which glibc
    # mmaps and faults in anew above 32 MB (measured at the make-bench shape, 2,048 x 8,192 logits: ~20,800
    # faults per forward, 1-2,000 with freed memory kept).
    with _prepared_for(inference, data_path) as prepared, keep_freed_memory():
        max_batches = math.ceil(max_examples / spec.training.batch_size)
        try:
            val = validation_metrics(
                model, prepared, spec, dev, max_batches=max_batches, autocast=autocast, on_batch=on_batch
            )
        finally:
            recorder.close()
        pairs = [] if classification else _held_out_pairs(inference, prepared, prompts, max_new_tokens, seed)

    metrics: dict[str, Any] = {"val_loss": val["val_loss"], "val_examples": examples}
    report: dict[str, Any] = {
        "task": spec.model.task,
        "checkpoint": {"path": str(inference.checkpoint), "step": inference.step, "sha256": inference.sha256},
        "spec": spec.model_dump(mode="json"),
        "settings": {
            "max_examples": max_examples,
            "prompts": prompts,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "device": str(dev),
            "precision": precision,
            "decoding": "greedy",
        },
        "metrics": metrics,
        "routing": recorder.statistics(),
    }
    if classification:
        assert inference.labels is not None  # load_for_inference sets them for classification
        labels = inference.labels
        scores = classification_metrics(y_true, y_pred, len(labels))
        metrics.update(accuracy=scores["accuracy"], macro_f1=scores["macro_f1"])
        report["classification"] = {"labels": labels, "confusion": scores["confusion"]}
        report["samples"] = [
            {
                "text": inference.tokenizer.decode(ids[:-1], skip_special_tokens=True),  # without the closing <eos>
                "label": labels[y],
                "predicted": labels[p],
                "probabilities": {str(label): prob for label, prob in zip(labels, probs, strict=True)},
            }
            for (ids, probs), y, p in list(zip(rows, y_true, y_pred, strict=True))[:prompts]
        ]
    else:
        metrics["val_ppl"] = _json_float(val["val_ppl"])
        if mtp_losses:
            metrics["val_mtp_loss"] = sum(mtp_losses) / len(mtp_losses)
        m = spec.model
        report["kv_cache"] = {
            "attention": m.attention,
            "bytes_per_token": kv_cache_bytes_per_token(spec),
            "bytes_per_token_mha": 2 * m.num_layers * m.num_heads * m.head_dim * 4,
        }
        outputs = [
            inference.tokenizer.decode(
                list(_token_stream(inference, prompt, max_new_tokens, 0.0, None, None, None, {})),
                skip_special_tokens=True,
            )
            for prompt, _ in pairs
        ]
        references = [reference for _, reference in pairs]
        level = metric_level(references)
        report["settings"]["metric_level"] = level if pairs else None
        metrics["bleu4"] = bleu4(outputs, references, level=level) if pairs else None
        metrics["rouge_l"] = rouge_l(outputs, references, level=level) if pairs else None
        report["samples"] = [
            {"prompt": prompt, "reference": reference, "output": output}
            for (prompt, reference), output in zip(pairs, outputs, strict=True)
        ]
    return report
