"""Batched sampling from the student, for on-policy distillation.

The prompts of one batch are left-padded and prefilled once into mlx-lm's `BatchKVCache`; the
prompt cache is then repeated `samples` times along the batch axis, so the samples of one prompt
share its prefill. Decoding is ancestral sampling with temperature and top-p. All randomness comes
from an explicit `mx.random` key, so the same key, weights and prompts give the same samples (a
resumed run replays exactly what an uninterrupted one would have drawn).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Check for finished rows every few decode steps: each check is a host sync.
SYNC_EVERY = 4


def _draw(logits: mx.array, temperature: float, top_p: float, key: mx.array) -> mx.array:
    """(B, V) logits -> (B,) token ids: argmax at temperature 0, else a top-p draw."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    logprobs = logits.astype(mx.float32) / temperature
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    if top_p < 1.0:
        from mlx_lm.sample_utils import apply_top_p

        logprobs = apply_top_p(logprobs, top_p)
    return mx.random.categorical(logprobs, key=key)


def sample_completions(
    model: nn.Module,
    prompts: Sequence[np.ndarray],
    *,
    samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    eos_ids: Sequence[int] = (),
    vocab_size: int | None = None,
    key: mx.array | None = None,
) -> list[np.ndarray]:
    """Sample `samples` completions of each prompt from `model`.

    prompts: P token-id arrays (already chat-formatted). eos_ids: tokens that end a completion
    (kept as its last token). vocab_size: draw only ids below it (embedding rows past the
    tokenizer's ids are padding). key: an `mx.random.key`; required unless temperature is 0.
    Returns P * samples int32 arrays, prompt-major (the samples of prompt 0 first), each at most
    max_new_tokens long.
    """
    from mlx_lm.models.cache import BatchKVCache

    if temperature > 0 and key is None:
        raise ValueError("sample_completions: temperature > 0 needs an explicit key")
    P = len(prompts)
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    pad = [width - n for n in lengths]
    batch = np.zeros((P, width), np.int32)
    for i, p in enumerate(prompts):
        batch[i, pad[i] :] = p
    cache = [BatchKVCache(pad) for _ in model.layers]
    logits = model(mx.array(batch), cache=cache)[:, -1, :]
    if samples > 1:
        order = mx.array(np.repeat(np.arange(P), samples))
        for c in cache:
            c.filter(order)
        logits = logits[order]
    B = P * samples
    keys = mx.random.split(key, max_new_tokens) if temperature > 0 else [None] * max_new_tokens
    eos = np.array(sorted(set(eos_ids)), np.int32)
    drawn: list[mx.array] = []
    done = np.zeros(B, bool)
    for t in range(max_new_tokens):
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        token = _draw(logits, temperature, top_p, keys[t])
        drawn.append(token)
        if (t + 1) % SYNC_EVERY == 0 or t + 1 == max_new_tokens:
            recent = np.array(mx.stack(drawn[-SYNC_EVERY:], axis=1))
            done |= np.isin(recent, eos).any(axis=1)
            if done.all():
                break
        logits = model(token[:, None], cache=cache)[:, -1, :]
    tokens = np.array(mx.stack(drawn, axis=1)).astype(np.int32)
    out = []
    for row in tokens:
        hits = np.flatnonzero(np.isin(row, eos))
        out.append(row[: hits[0] + 1] if hits.size else row)
    return out
