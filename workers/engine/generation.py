"""Text generation from a causal-LM ``MoETransformer``: sampling, a KV-cached token stream, and ``generate``."""

from __future__ import annotations

from collections.abc import Generator

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.engine.model import KVCache, MoETransformer


def _sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``. ``temperature <= 0`` is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the best token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate_tokens(
    model: MoETransformer,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Generator[Tensor, None, None]:
    """Yield the next token ids ``(B,)`` of ``input_ids`` ``(B, T)`` (unpadded prompts of one length), one
    step at a time, up to ``max_new_tokens`` steps: what ``generate`` concatenates, and what a playground
    streams.

    Uses a KV cache (MLA models: the compressed cache of latents, see ``LatentAttention``); the
    multi-token prediction modules are not run. Once the sequence would exceed ``max_seq_len``, each step
    re-reads the last ``max_seq_len`` tokens without a cache (a sliding window). A sequence that produced ``eos_id``
    keeps emitting ``eos_id``; the iteration stops early once all have (after yielding that step). Runs in
    eval mode and restores the model's mode when the iteration ends or the iterator is closed.
    """
    if model.task != "causal_lm":
        raise ValueError("generate needs a causal_lm model")
    was_training = model.training
    model.eval()
    try:
        max_len = model.spec.model.max_seq_len
        weight = model.head_weight
        tokens = input_ids
        caches: list[KVCache] | None = [KVCache() for _ in model.layers]
        pending = input_ids[:, -max_len:]  # tokens not yet in the cache
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            if caches is not None and caches[0].length + pending.shape[1] > max_len:
                caches = None  # past the position table: fall back to a sliding window
            if caches is None:
                pending = tokens[:, -max_len:]
            x, _, _ = model.hidden_states(pending, caches)
            logits = F.linear(x[:, -1], weight)  # (B, V)
            nxt = _sample(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            tokens = torch.cat((tokens, nxt.unsqueeze(1)), dim=1)
            pending = nxt.unsqueeze(1)
            yield nxt
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)


def generate(
    model: MoETransformer,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Extend ``input_ids`` ``(B, T)`` (unpadded prompts of one length) by up to ``max_new_tokens``.

    The steps of ``generate_tokens`` (KV cache, sliding window past ``max_seq_len``, ``eos_id`` handling,
    eval mode restored afterwards), concatenated. Returns ``(B, T + generated)``.
    """
    steps = generate_tokens(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id, generator)
    return torch.cat((input_ids, *(nxt.unsqueeze(1) for nxt in steps)), dim=1)
