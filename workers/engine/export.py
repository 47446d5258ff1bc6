"""Deployment artifacts of a checkpoint: safetensors weights, tokenizer, spec, ONNX, int8; latency and advice.

- ``export_artifacts(checkpoint_dir, out_dir)`` writes ``model.safetensors``, ``tokenizer.json``, ``spec.json``,
  ``model.onnx`` (and ``labels.json`` for classification).
- ``export_onnx(model, path)``: ``input_ids`` ``(batch, seq)`` (+ ``attention_mask`` for classification) ->
  ``logits``, both axes dynamic, ``seq`` up to ``max_seq_len``.
- ``quantize_int8(model)``: a copy with int8 dynamic quantization of its linear layers, routed experts included.
- ``measure_latency(...)``: PyTorch fp32, PyTorch int8 and ONNX Runtime fp32 forward latency and size.
- ``deployment_advice(report)``: for each latency target, the variant to deploy, with reasons from the figures.

Why the routed experts are rewritten for export and int8 (``ExpertLoopMoE``): the training layer dispatches
with a sort, ``bincount`` and ``grouped_mm`` over groups whose sizes depend on the data. An exporter cannot
express ``grouped_mm`` (and a trace of the fallback would bake in the group sizes of the example input, i.e.
only the experts that example reached). ``ExpertLoopMoE`` keeps the router and shared experts, and holds each
routed expert as its own pair of ``nn.Linear``; its forward visits every expert, each on the tokens routed to
it (found with ``nonzero``: a dynamic shape in the graph, not a constant), so every expert is in the ONNX graph
and the compute stays sparse. Same numerics: the same routing, and the experts' outputs are added to each
token in the same (ascending expert) order. As ``nn.Linear`` the experts are also what dynamic int8
quantization converts.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import save_model
from torch import Tensor, nn

from workers.engine.evaluate import load_for_inference
from workers.engine.kernels import activate
from workers.engine.model import MoEFeedForward, MoEStats, MoETransformer

VARIANTS: dict[str, str] = {
    "pytorch_fp32": "PyTorch fp32",
    "pytorch_int8": "PyTorch int8 (dynamic)",
    "onnxruntime_fp32": "ONNX Runtime fp32",
}


# --------------------------------------------------------------------------------------------------------
# An export- and quantization-friendly MoE layer
# --------------------------------------------------------------------------------------------------------


class ExpertLoopMoE(MoEFeedForward):
    """Inference-only DeepSeekMoE layer with the routing of ``source`` and each routed expert as two
    ``nn.Linear``; see the module docstring. ``aux`` is 0 (no training losses); ``routed == kept`` (inference
    never drops tokens)."""

    def __init__(self, source: MoEFeedForward) -> None:
        nn.Module.__init__(self)  # not MoEFeedForward.__init__: the stacked expert weights are replaced
        self.moe = source.moe
        self.activation = source.activation
        self.num_experts = source.num_experts
        self.top_k = source.top_k
        self.hidden = source.hidden
        self.router = source.router
        self.shared = source.shared
        self.experts_in = nn.ModuleList(_linear(w) for w in source.w_in.detach())  # each (C, 2H or H)
        self.experts_out = nn.ModuleList(_linear(w) for w in source.w_out.detach())  # each (H, C)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        _, _, chosen, weights = self.route(flat)  # (N, k) each
        N, E = flat.shape[0], self.num_experts
        gates = torch.zeros(N, E, dtype=weights.dtype, device=x.device).scatter(1, chosen, weights)  # (N, E)
        hit = torch.zeros(N, E, dtype=torch.bool, device=x.device).scatter(
            1, chosen, torch.ones_like(chosen, dtype=torch.bool)
        )
        out = torch.zeros_like(flat)
        for e, (w_in, w_out) in enumerate(zip(self.experts_in, self.experts_out, strict=True)):
            tokens = hit[:, e].nonzero().squeeze(1)  # (M_e,) the tokens routed to expert e: a dynamic shape
            h = activate(w_in(flat.index_select(0, tokens)), self.activation, self.hidden)  # (M_e, H)
            y = w_out(h) * gates[:, e].index_select(0, tokens).unsqueeze(1).to(h.dtype)  # (M_e, C)
            out = out.index_add(0, tokens, y.to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        routed = hit.sum(dim=0)  # (E,)
        return out.view(B, T, C), MoEStats(aux=flat.new_zeros((), dtype=torch.float32), routed=routed, kept=routed)


def _linear(weight_in_out: Tensor) -> nn.Linear:
    """An ``nn.Linear`` computing ``x @ weight_in_out`` (``nn.Linear`` stores ``(out, in)``)."""
    fan_in, fan_out = weight_in_out.shape
    linear = nn.Linear(fan_in, fan_out, bias=False, device=weight_in_out.device, dtype=weight_in_out.dtype)
    linear.weight = nn.Parameter(weight_in_out.t().contiguous())
    return linear


def expert_loop_model(model: MoETransformer) -> MoETransformer:
    """A copy of ``model`` in eval mode whose MoE layers are ``ExpertLoopMoE`` (``model`` is not changed)."""
    copied = copy.deepcopy(model).eval()
    for block in copied.blocks:
        if isinstance(block.ffn, MoEFeedForward) and not isinstance(block.ffn, ExpertLoopMoE):
            block.ffn = ExpertLoopMoE(block.ffn)
    return copied


# --------------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------------


class _Logits(nn.Module):
    """The model as an exporter sees it: token ids (and a mask for classification) -> logits only."""

    def __init__(self, model: MoETransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids, attention_mask=attention_mask).logits


def onnx_example_inputs(model: MoETransformer) -> dict[str, Tensor]:
    """The example the exporter traces: 2 sequences of 3 copies of one token.

    Every position then carries the same hidden state, so every token is routed to the same ``top_k``
    experts in each layer, on purpose: a graph that only covered the experts its example reached would
    fail on any other input, which the tests check.
    """
    ids = torch.full((2, 3), 3, dtype=torch.long, device=model.embed.weight.device)
    if model.task == "classification":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


def export_onnx(model: MoETransformer, path: str | os.PathLike[str], *, optimize: bool = True) -> Path:
    """Export ``model`` (every routed expert kept) to ONNX at ``path`` with the torch.export-based exporter.

    Inputs: ``input_ids`` int64 ``(batch, seq)``; classification also ``attention_mask`` int64 ``(batch, seq)``
    (1 for real tokens, pads on the right). Output: ``logits`` float32 ``(batch, seq, vocab)`` for causal_lm,
    ``(batch, num_labels)`` for classification. ``batch`` and ``seq`` are dynamic, ``seq`` at most
    ``max_seq_len``. ``optimize`` runs onnxscript's graph optimizer (constant folding, dead code removal).
    Weights are stored inside the file unless they exceed protobuf's 2 GB limit (then ``<path>.data`` too).
    """
    target = Path(path)
    # The exporter's passes log every step at INFO: hundreds of lines per export in a worker's log.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    wrapper = _Logits(expert_loop_model(model).cpu().float()).eval()
    example = {name: t.cpu() for name, t in onnx_example_inputs(wrapper.model).items()}
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=model.spec.model.max_seq_len)
    shapes = {name: {0: batch, 1: seq} for name in example}
    with warnings.catch_warnings():
        # The exporter warns about its own internals (pytree deprecations, torchvision not installed).
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (),
            kwargs=example,
            dynamo=True,
            input_names=list(example),
            output_names=["logits"],
            dynamic_shapes=shapes,
            optimize=optimize,
            verbose=False,
        )
    assert program is not None  # the dynamo exporter always returns its program
    # Per-node metadata (source stack traces, FX node text) is ~3x the weights of a small model and carries
    # this machine's file paths into a deployment artifact: drop it.
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None
    # Saved aside under the final file name (an external data file records that name inside the graph),
    # then moved: a reader never sees a half-written model.
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as scratch:
        program.save(str(Path(scratch) / target.name))
        data = Path(scratch) / f"{target.name}.data"
        if data.exists():  # a model over protobuf's 2 GB limit keeps its weights beside the graph
            os.replace(data, target.with_name(data.name))
        os.replace(Path(scratch) / target.name, target)
    return target


def onnx_size_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of an ONNX model on disk, its external data file included."""
    target = Path(path)
    data = target.with_name(target.name + ".data")
    return target.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _onnx_session(path: str | os.PathLike[str], threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(
    path: str | os.PathLike[str], input_ids: np.ndarray, attention_mask: np.ndarray | None = None
) -> np.ndarray:
    """Logits of an exported model under ONNX Runtime (CPU), for int64 ``input_ids`` ``(B, T)``."""
    session = _onnx_session(path, None)
    feeds = {"input_ids": input_ids.astype(np.int64)}
    if attention_mask is not None:
        feeds["attention_mask"] = attention_mask.astype(np.int64)
    return cast(np.ndarray, session.run(["logits"], feeds)[0])


# --------------------------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------------------------


def quantize_int8(model: MoETransformer) -> MoETransformer:
    """A copy of ``model`` (eval mode, CPU) with dynamic int8 quantization of its linear layers.

    int8 weights (per-tensor scale) and int8 matmuls with activations quantized on the fly, for: attention
    projections, shared experts, dense feed-forwards, every routed expert (via ``ExpertLoopMoE``) and the
    classifier. Stay fp32: the embedding and the output head, tied or not (the model multiplies by the head's
    weight directly, and the logits are what rounding would hurt most), the routers (so expert choices do not
    move with rounding), MLA's key/value up-projection (see below), the norms and the rotary
    tables. ``model`` is not changed.
    """
    loop = expert_loop_model(model).cpu().float()
    # MLA's key/value up-projection stays fp32 too: cached decoding reads its weight as a matrix (to absorb it
    # into the query and output), which a dynamically quantized linear does not expose.
    names = {
        name
        for name, module in loop.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head" and not name.endswith(".kv_up")
    }
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it is deprecated in favour of torchao (not a dependency here).
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(loop, names, dtype=torch.qint8, inplace=True)
    return cast(MoETransformer, quantized)


def state_dict_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the on-disk size of a variant (int8 cannot be safetensors)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), path)
        return path.stat().st_size


def safetensors_size_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


# --------------------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------------------


def export_artifacts(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Write the deployment files of a (verified) checkpoint into ``out_dir``; returns ``{name: path}``.

    ``model.safetensors`` (the checkpoint's weights file, byte for byte, so its SHA-256 is the checkpoint's),
    ``tokenizer.json`` (the run's), ``spec.json``, ``model.onnx`` (``export_onnx``; ``model.onnx.data`` too
    for a model over 2 GB) and, for classification, ``labels.json`` (label of each logit). Each file appears
    whole or not at all (written aside, then renamed). ``data_dir`` as for ``load_for_inference``.
    """
    inference = load_for_inference(checkpoint_dir, data_dir=data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def place(name: str, write: Any) -> None:
        tmp = out / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, out / name)
        written[name] = out / name

    place("model.safetensors", lambda p: shutil.copyfile(inference.checkpoint / "model.safetensors", p))
    place("tokenizer.json", lambda p: inference.tokenizer.save(str(p)))
    place("spec.json", lambda p: p.write_text(inference.spec.model_dump_json(indent=2)))
    if inference.labels is not None:
        labels = inference.labels
        place("labels.json", lambda p: p.write_text(json.dumps(labels)))
    written["model.onnx"] = export_onnx(inference.model, out / "model.onnx")
    data = out / "model.onnx.data"
    if data.exists():
        written["model.onnx.data"] = data
    return written


# --------------------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------------------


def measure_latency(
    source: MoETransformer | str | os.PathLike[str],
    *,
    onnx_path: str | os.PathLike[str] | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    seq_len: int | None = None,
    repeats: int = 20,
    warmup: int = 2,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Forward-pass latency and size of each deployment variant, on this machine's CPU.

    ``source``: a model or a checkpoint directory. ``onnx_path``: its exported ONNX file; None exports one
    into a temporary directory. Every variant gets the same random ``(batch, seq_len)`` token ids
    (``seq_len`` default ``data.seq_len``); rounds interleave the variants (one forward each per round, after
    ``warmup`` untimed rounds) so that machine noise hits them alike. ``threads``: torch and ONNX Runtime
    intra-op threads (None: torch's current setting, for both).

    Returns ``{"settings": {...}, "variants": {name: {"label", "size_bytes", "latency": [{"batch_size",
    "median_ms", "p90_ms", "tokens_per_s"}]}}}`` for the names in ``VARIANTS``; ``tokens_per_s`` is
    ``batch_size * seq_len`` over the median.
    """
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError("batch_sizes must be positive integers")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be at least 1 and warmup at least 0")
    if isinstance(source, MoETransformer):
        fp32 = copy.deepcopy(source).cpu().float().eval()
        fp32_size = safetensors_size_bytes(fp32)
    else:
        fp32 = load_for_inference(source).model
        fp32_size = (Path(source) / "model.safetensors").stat().st_size
    spec = fp32.spec
    T = seq_len if seq_len is not None else spec.data.seq_len
    if not 1 <= T <= spec.model.max_seq_len:
        raise ValueError(f"seq_len must be between 1 and max_seq_len {spec.model.max_seq_len}, got {T}")
    int8 = quantize_int8(fp32)
    previous_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = Path(onnx_path) if onnx_path is not None else export_onnx(fp32, Path(tmp) / "model.onnx")
        # Same intra-op threads for ONNX Runtime as torch uses (its own default is every core): a fair race.
        session = _onnx_session(onnx_file, threads if threads is not None else previous_threads)
        sizes = {
            "pytorch_fp32": fp32_size,
            "pytorch_int8": state_dict_size_bytes(int8),
            "onnxruntime_fp32": onnx_size_bytes(onnx_file),
        }
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            timings = _time_variants(fp32, int8, session, batch_sizes, T, repeats, warmup, seed)
        finally:
            torch.set_num_threads(previous_threads)
    variants: dict[str, Any] = {}
    for name, label in VARIANTS.items():
        rows = []
        for b in batch_sizes:
            ms = sorted(timings[name][b])
            median = statistics.median(ms)
            rows.append(
                {
                    "batch_size": b,
                    "median_ms": median,
                    "p90_ms": float(np.percentile(ms, 90)),
                    "tokens_per_s": b * T / (median / 1000.0),
                }
            )
        variants[name] = {"label": label, "size_bytes": sizes[name], "latency": rows}
    return {
        "settings": {
            "batch_sizes": list(batch_sizes),
            "seq_len": T,
            "repeats": repeats,
            "warmup": warmup,
            "threads": threads if threads is not None else previous_threads,
            "device": "cpu",
        },
        "variants": variants,
    }


@torch.no_grad()
def _time_variants(
    fp32: MoETransformer,
    int8: MoETransformer,
    session: Any,
    batch_sizes: Sequence[int],
    seq_len: int,
    repeats: int,
    warmup: int,
    seed: int,
) -> dict[str, dict[int, list[float]]]:
    generator = torch.Generator().manual_seed(seed)
    vocab = fp32.spec.model.vocab_size
    classification = fp32.task == "classification"
    timings: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batch_sizes} for name in VARIANTS}
    for b in batch_sizes:
        ids = torch.randint(0, vocab, (b, seq_len), generator=generator)
        mask = torch.ones_like(ids) if classification else None
        feeds = {"input_ids": ids.numpy()}
        if mask is not None:
            feeds["attention_mask"] = mask.numpy()
        runs: dict[str, Callable[[], object]] = {
            "pytorch_fp32": functools.partial(fp32, ids, attention_mask=mask),
            "pytorch_int8": functools.partial(int8, ids, attention_mask=mask),
            "onnxruntime_fp32": functools.partial(session.run, ["logits"], feeds),
        }
        for round_ in range(warmup + repeats):
            for name, run in runs.items():
                began = time.perf_counter()
                run()
                elapsed_ms = (time.perf_counter() - began) * 1000.0
                if round_ >= warmup:
                    timings[name][b].append(elapsed_ms)
    return timings


# --------------------------------------------------------------------------------------------------------
# Advice
# --------------------------------------------------------------------------------------------------------


def _fmt_ms(ms: float) -> str:
    return f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2f} ms"


def deployment_advice(
    latency_report: dict[str, Any], *, targets_ms: Sequence[float] = (10, 50, 200)
) -> list[dict[str, Any]]:
    """For each latency target (per forward pass), the variant to deploy and why, from ``measure_latency``'s
    figures.

    A variant meets a target at a batch size when its p90 latency there is within the target. Among those
    operating points, the pick is the one with the highest throughput (tokens/s); ties go to the smaller file.
    At a tight target that is the fastest variant at batch 1; at a looser one a larger batch may fit and
    win. Each entry: ``{"target_ms", "variant" (None when nothing meets it), "label", "batch_size",
    "p90_ms", "median_ms", "tokens_per_s", "size_bytes", "reason"}``; ``reason`` compares the pick with the
    other variants at batch 1 (latency and size ratios) and says what meets the target.
    """
    variants: dict[str, Any] = latency_report["variants"]
    if not variants:
        raise ValueError("the latency report has no variants")
    advice = []
    for target in targets_ms:
        points = [(name, row) for name, v in variants.items() for row in v["latency"] if row["p90_ms"] <= target]
        entry: dict[str, Any] = {"target_ms": target}
        if not points:
            fastest, row = min(
                ((n, _batch_row(v, 1) or v["latency"][0]) for n, v in variants.items()), key=lambda p: p[1]["p90_ms"]
            )
            entry.update(
                variant=None,
                label=None,
                batch_size=None,
                p90_ms=None,
                median_ms=None,
                tokens_per_s=None,
                size_bytes=None,
            )
            entry["reason"] = (
                f"No variant meets {target:g} ms: the fastest, {variants[fastest]['label']}, takes "
                f"{_fmt_ms(row['p90_ms'])} (p90) at batch {row['batch_size']}. Use a smaller model, shorter "
                "sequences or faster hardware."
            )
            advice.append(entry)
            continue
        name, row = max(points, key=lambda p: (p[1]["tokens_per_s"], -variants[p[0]]["size_bytes"]))
        chosen = variants[name]
        entry.update(
            variant=name,
            label=chosen["label"],
            batch_size=row["batch_size"],
            p90_ms=row["p90_ms"],
            median_ms=row["median_ms"],
            tokens_per_s=row["tokens_per_s"],
            size_bytes=chosen["size_bytes"],
        )
        entry["reason"] = _reason(name, row, variants, target)
        advice.append(entry)
    return advice


def _batch_row(variant: dict[str, Any], batch_size: int) -> dict[str, Any] | None:
    for row in variant["latency"]:
        if row["batch_size"] == batch_size:
            return cast(dict[str, Any], row)
    return None


def _reason(name: str, row: dict[str, Any], variants: dict[str, Any], target: float) -> str:
    chosen = variants[name]
    parts = [
        f"{chosen['label']} at batch {row['batch_size']}: p90 {_fmt_ms(row['p90_ms'])} (median "
        f"{_fmt_ms(row['median_ms'])}) is within {target:g} ms at {row['tokens_per_s']:,.0f} tokens/s, the highest "
        "throughput that meets the target"
    ]
    base = _batch_row(chosen, 1)
    for other, v in variants.items():
        if other == name:
            continue
        other_base = _batch_row(v, 1)
        size_ratio = v["size_bytes"] / chosen["size_bytes"]
        if base is not None and other_base is not None:
            speed = other_base["median_ms"] / base["median_ms"]
            if abs(speed - 1) < 0.05:  # within the run-to-run noise of a CPU: say so rather than "1.0x"
                pace = "about as fast"
            else:
                pace = f"{speed:.1f}× slower" if speed > 1 else f"{1 / speed:.1f}× faster"
            parts.append(
                f"{v['label']} takes {_fmt_ms(other_base['median_ms'])} at batch 1 ({pace}) and is "
                f"{size_ratio:.2f}× the size"
            )
        else:
            parts.append(f"{v['label']} is {size_ratio:.2f}× the size")
    return "; ".join(parts) + "."
