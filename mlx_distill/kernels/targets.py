"""Types accepted by `distill_loss`: teacher targets, quantized head weights, logits transforms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import numpy as np


class SparseTargets(NamedTuple):
    """A teacher's top-k or sampled entries per token.

    ids: (N, k) or (B, L, k) int32 vocabulary ids; logprobs: same shape, float log-probabilities
    (already at the loss temperature; `-inf` marks an empty slot).
    """

    ids: mx.array
    logprobs: mx.array


class LowRank(NamedTuple):
    """A low-rank term of the LM head (a LoRA-adapted head): logits = h @ W.T + u @ b.T.

    u: (N, r) or (B, L, r), the hidden states through the adapter's down projection (times its
    scale); b: (V, r), the adapter's up projection as rows of the vocabulary. The loss adds the
    term chunk by chunk, so the adapted (V, d) matrix never exists; gradients flow to u and b.
    """

    u: mx.array
    b: mx.array


class DenseTargets(NamedTuple):
    """Full teacher logits: (N, V) or (B, L, V)."""

    logits: mx.array


class QuantizedWeight(NamedTuple):
    """A quantized (V, d) LM head as `mx.quantize` packs it (affine, mxfp4, mxfp8, nvfp4).

    weight: (V, d * bits / 32) uint32; scales: (V, d / group_size); biases: same, or None for
    the modes without biases. The loss multiplies with `mx.quantized_matmul` and dequantizes
    only the gathered rows, so the whole (V, d) matrix never exists in float.
    """

    weight: mx.array
    scales: mx.array
    biases: mx.array | None
    group_size: int
    bits: int
    mode: str = "affine"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 32 // self.bits)

    def dequantize(self, dtype=mx.float32) -> mx.array:
        """The whole (V, d) float matrix (tests and small heads only)."""
        return mx.dequantize(
            self.weight,
            self.scales,
            self.biases,
            self.group_size,
            self.bits,
            mode=self.mode,
            dtype=dtype,
        )


@dataclass
class LogitTransform:
    """What an architecture does to `hidden @ W.T` before the softmax.

    logits = softcap(hidden_scale * logit_scale * (hidden @ W.T) + bias), where
    softcap(x) = c * tanh(x / c) (skipped when `softcap` is None), then the ids in `masked_ids`
    are set to -inf. The two scales are applied as one product (the same map: the head is
    linear). bias: (V,) float or None; it receives a gradient like the weight.
    """

    logit_scale: float = 1.0
    hidden_scale: float = 1.0
    softcap: float | None = None
    bias: mx.array | None = None
    masked_ids: tuple[int, ...] = ()

    @property
    def scale(self) -> float:
        return float(self.logit_scale) * float(self.hidden_scale)

    @property
    def is_identity(self) -> bool:
        return (
            self.scale == 1.0 and self.softcap is None and self.bias is None and not self.masked_ids
        )

    def apply(self, raw: mx.array) -> mx.array:
        """The transform on materialized logits raw = hidden @ W.T (..., V)."""
        z = raw * self.scale if self.scale != 1.0 else raw
        if self.bias is not None:
            z = z + self.bias.astype(z.dtype)
        if self.softcap is not None:
            z = self.softcap * mx.tanh(z / self.softcap)
        if self.masked_ids:
            z = z + self.mask_vector(z.shape[-1], z.dtype)
        return z

    def mask_vector(self, vocab: int, dtype=mx.float32) -> mx.array:
        """(V,): -inf at `masked_ids`, 0 elsewhere."""
        vec = np.zeros(vocab, dtype=np.float32)
        vec[np.asarray(self.masked_ids, dtype=np.int64)] = -np.inf
        return mx.array(vec).astype(dtype)
