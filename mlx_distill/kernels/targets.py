"""Teacher target containers accepted by `distill_loss`."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx


class SparseTargets(NamedTuple):
    """A teacher's top-k or sampled entries per token.

    ids: (N, k) or (B, L, k) int32 vocabulary ids; logprobs: same shape, float log-probabilities
    (already at the loss temperature; `-inf` marks an empty slot).
    """

    ids: mx.array
    logprobs: mx.array


class DenseTargets(NamedTuple):
    """Full teacher logits: (N, V) or (B, L, V)."""

    logits: mx.array
