"""A few hundred milliseconds of measurement that tell the estimator how fast this CPU is today.

The CPU profile's rates (``workers.engine.hardware.cpu_profile``) were measured on this platform's reference
machine; a worker on another CPU, or on the same machine under other load, runs the same step in up to twice the
time (a 1024² fp32 matmul reached 135-390 GFLOP/s on 2 cores of the reference machine, depending on the day). Before
any calibration (timed steps of the user's own model), the worker measures the three rates that the estimator
reads of a CPU and advertises them with its devices (``workers.engine.devices``); the web tier's estimates for
that hardware class use them (``workers.engine.hardware.cpu_profile(rates=...)``).

- ``matmul_flops``: a 1024² fp32 matmul, as the profile's ``peak_flops["fp32"]``.
- ``layer_seconds``: one tiny-demo MoE block's forward and backward at 8 tokens, as the profile's
  ``layer_overhead_seconds`` (the time of dispatching its 234 calls, whatever their size): the difference
  between a 6-block and a 2-block model, over 4, so that the embedding, head and loss cancel.
- ``copy_bytes_per_s``: copying a 64 MiB tensor, as the profile's ``bandwidth_bytes_per_s``.
- ``dropout_seconds_per_element``: the engine's dropout (``workers.engine.kernels.Dropout``, p 0.1) of 2^20
  elements, as the profile's ``dropout_seconds_per_element``.

Each figure is the fastest of interleaved repetitions (see ``measure_cpu_rates``).
"""

from __future__ import annotations

import time

import torch

from workers.engine.hardware import CpuRates
from workers.engine.kernels import Dropout
from workers.engine.model import build_model
from workers.engine.spec import Spec

_MATMUL_SIZE = 1024
_COPY_BYTES = 64 * 2**20
_PROBE_TOKENS = 8
# Blocks of the two models whose difference is the blocks' time (how layer_overhead_seconds was measured).
_SMALL_LAYERS, _LARGE_LAYERS = 2, 6
_DROPOUT_ELEMENTS = 2**20
# The tiny demo's block (hardware.py's layer_overhead_seconds was measured on it): MHA, RMSNorm, SwiGLU experts,
# 8 routed top-2 and 1 shared, 128 wide; byte tokenizer (a small head: the probe times blocks, not the head).
_BLOCK = {
    "vocab_size": 260,
    "hidden_size": 128,
    "num_heads": 4,
    "max_seq_len": 16,
    "moe": {"num_routed_experts": 8, "num_shared_experts": 1, "top_k": 2, "expert_hidden_size": 128},
}


def _model(layers: int) -> torch.nn.Module:
    spec = Spec.model_validate(
        {"model": {**_BLOCK, "num_layers": layers}, "data": {"tokenizer": "bytes", "seq_len": _PROBE_TOKENS}}
    )
    torch.manual_seed(0)
    return build_model(spec)


def _step_seconds(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """One forward and backward, timed; gradients are dropped before it, as the optimizer's zero_grad does (a
    backward into existing gradients would add an accumulation per parameter)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model(tokens, labels=tokens)
    out.loss.backward()
    return time.perf_counter() - start


def measure_cpu_rates(repeats: int = 15) -> CpuRates:
    """This CPU's rates on torch's current thread count (a worker's training threads): ``repeats`` interleaved
    repetitions of each measurement (about 40 ms a repetition at the reference machine's rates), the fastest of
    each. The fastest, not the median: a rate is what the CPU can do, and other processes' bursts of load (on a
    shared machine, a 1024² matmul measured 174 GFLOP/s at one moment and 280 three minutes later) only ever
    slow a repetition down; the estimator's efficiencies were fitted against such best-case rates."""
    a = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE)
    b = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE)
    source = torch.zeros(_COPY_BYTES // 4)
    activations = torch.randn(_DROPOUT_ELEMENTS)
    dropout_layer = Dropout(0.1)  # a new module trains: the mask is drawn
    target = torch.empty_like(source)
    small, large = _model(_SMALL_LAYERS), _model(_LARGE_LAYERS)
    tokens = torch.randint(0, 256, (1, _PROBE_TOKENS))
    with torch.no_grad():  # first use: thread pools, oneDNN primitives, page faults of the buffers
        torch.mm(a, b)
        target.copy_(source)
        dropout_layer(activations)
    _step_seconds(small, tokens), _step_seconds(large, tokens)
    matmul, copy, dropout, few, many = [], [], [], [], []
    for _ in range(repeats):
        with torch.no_grad():
            start = time.perf_counter()
            torch.mm(a, b)
            matmul.append(time.perf_counter() - start)
            start = time.perf_counter()
            target.copy_(source)
            copy.append(time.perf_counter() - start)
            start = time.perf_counter()
            dropout_layer(activations)
            dropout.append(time.perf_counter() - start)
        few.append(_step_seconds(small, tokens))
        many.append(_step_seconds(large, tokens))
    per_layer = (min(many) - min(few)) / (_LARGE_LAYERS - _SMALL_LAYERS)
    return CpuRates(
        matmul_flops=2 * _MATMUL_SIZE**3 / min(matmul),
        layer_seconds=max(per_layer, 1e-6),
        copy_bytes_per_s=_COPY_BYTES / min(copy),
        dropout_seconds_per_element=min(dropout) / _DROPOUT_ELEMENTS,
        threads=torch.get_num_threads(),
    )
