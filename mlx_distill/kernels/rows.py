"""The per-row pass over one chunk of (masked) logits: the part a native kernel replaces.

`stats` returns per row the max `m` of the tail logits and `S = sum exp(s - m)` (and, for
cross-entropy at T != 1, `Sz = sum exp(T (s - m))`); `grad` forms
`dz = a * exp(s - m) + b * exp(T (s - m))` over the whole row. Ids already set to `-inf`
contribute nothing to either. `PortableRows` is plain MLX and the reference for the kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx


class RowStats(NamedTuple):
    """m, S, Sz: (n,) each (Sz None unless asked); cache: whatever `grad` can reuse."""

    m: mx.array
    S: mx.array
    Sz: mx.array | None
    cache: tuple


class PortableRows:
    """Plain MLX ops; keeps the exponentials of the chunk for `grad` (one exp pass per chunk)."""

    name = "portable"

    def stats(self, s: mx.array, temperature: float | None) -> RowStats:
        """s: (n, V). `temperature` is given only when Sz is needed."""
        m = mx.max(s, axis=-1)
        # A row that is all -inf (every id in K) has an empty tail: keep exp() at 0, not NaN.
        m = mx.where(m > float("-inf"), m, 0.0)
        x = s - m[:, None]
        e = mx.exp(x)
        ez = mx.exp(temperature * x) if temperature is not None else None
        Sz = mx.sum(ez, axis=-1) if ez is not None else None
        return RowStats(m, mx.sum(e, axis=-1), Sz, (e, ez))

    def grad(self, s: mx.array, st: RowStats, a: mx.array, b: mx.array | None) -> mx.array:
        """dz (n, V) = a[:, None] * exp(s - m) + b[:, None] * exp(T (s - m))."""
        e, ez = st.cache
        dz = a[:, None] * e
        if b is not None:
            dz = dz + b[:, None] * ez
        return dz
