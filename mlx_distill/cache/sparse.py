"""Sparse teacher targets for one sequence: top-k and Random-Sampling KD (RS-KD).

A sequence's targets are ragged: for each target position (a t with mask[t + 1]) a few
(id, log-prob) entries. `topk` keeps the k most probable ids; `sample` draws n ids from the teacher
distribution and keeps the distinct ids with weight count / n. E[count_i / n] = p_i, so the sparse
target is an unbiased estimate of the full distribution (Anshumann et al., ACL 2025), while top-k
systematically drops the tail.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np


class RowTargets(NamedTuple):
    """Targets of one sequence with P target positions and E entries in all.

    counts: (P,) int32 entries per position; ids: (E,) int32; logprobs: (E,) float32, at the cache
    temperature (for `sample`, log(count / n), the log-weight of the unbiased estimate).
    """

    counts: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray


def tempered_logprobs(logits: mx.array, temperature: float) -> mx.array:
    """(..., V) logits -> (..., V) log softmax(logits / temperature): a teacher's targets."""
    scaled = logits / temperature
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def topk_targets(logprobs: mx.array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(..., V) log-probs -> ids (..., k') int32 and log-probs (..., k') float32, sorted
    descending; k' = min(k, V)."""
    k = min(k, logprobs.shape[-1])
    idx = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(logprobs, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    idx = mx.take_along_axis(idx, order, axis=-1)
    vals = mx.take_along_axis(vals, order, axis=-1)
    mx.eval(idx, vals)
    return np.array(idx, dtype=np.int32), np.array(vals, dtype=np.float32)


def sample_targets(
    logprobs: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw n ids per position from (P, V) log-probs; keep distinct ids with their counts.

    Returns counts_per_position (P,) int32, ids (E,) int32 and draw counts (E,) int32, entries of
    a position in ascending id order. Inverse-CDF sampling on all positions at once: each row's
    CDF is shifted by its row index so one `searchsorted` serves every row.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    P, V = lp.shape
    if P == 0:
        empty = np.zeros(0, dtype=np.int32)
        return empty, empty, empty
    p = np.exp(lp - lp.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    offset = np.arange(P, dtype=np.float64)[:, None]
    u = rng.random((P, n))
    flat = np.searchsorted((cdf + offset).ravel(), (u + offset).ravel(), side="right")
    draws = np.minimum(flat.reshape(P, n) - np.arange(P)[:, None] * V, V - 1)
    draws = np.sort(draws, axis=1)
    first = np.ones((P, n), dtype=bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    starts = np.flatnonzero(first.ravel())
    runs = np.diff(np.append(starts, P * n))
    return (
        first.sum(axis=1).astype(np.int32),
        draws.ravel()[starts].astype(np.int32),
        runs.astype(np.int32),
    )
