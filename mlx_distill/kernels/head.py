"""The LM head inside the fused loss, for heads that are not a plain dense `h @ W.T`.

Per chunk of n rows: `raw = h_c @ W.T` (dense, or `mx.quantized_matmul` on a quantized head,
which never dequantizes the matrix), then the architecture's transform
`z = softcap(scale * raw + bias)` with the masked ids at -inf (`LogitTransform`). The loss works
on `s = z / T` as for a plain head; `backward` takes `dz = dL/dz` back to `dL/draw` (and
`dL/dbias`). Everything here is (n, V) or (n, k): the fused path stays O(chunk x V).

A plain dense head without transform never comes here (`Spec.plain_head`): its arithmetic is
exactly what it was before heads had transforms.
"""

from __future__ import annotations

import mlx.core as mx


def prepare_weight(spec, W, cd):
    """W in the compute dtype: a dense (V, d) array, or from the quantized [weight, scales
    (, biases)] list the triple (weight, scales, biases or None) with float scales and biases
    cast to `cd` (mx.quantized_matmul wants them in the input's dtype)."""
    if spec.quant is None:
        return W.astype(cd)
    w, scales = W[0], W[1]
    biases = W[2] if len(W) > 2 else None
    if mx.issubdtype(scales.dtype, mx.floating):
        scales = scales.astype(cd)
    if biases is not None:
        biases = biases.astype(cd)
    return (w, scales, biases)


def _qargs(spec) -> dict:
    group_size, bits, mode = spec.quant
    return {"group_size": group_size, "bits": bits, "mode": mode}


def matmul_t(spec, x, W):
    """x (n, d) -> x @ W.T (n, V)."""
    if spec.quant is None:
        return x @ W.T
    w, scales, biases = W
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, **_qargs(spec))


def raw(spec, x, W, u=None, b=None):
    """The head's raw logits (n, V): x @ W.T, plus u @ b.T for a low-rank (LoRA) term
    (u (n, r), b (V, r))."""
    out = matmul_t(spec, x, W)
    return out if u is None else out + u @ b.T


def matmul(spec, dz, W):
    """dz (n, V) -> dz @ W (n, d)."""
    w, scales, biases = W
    return mx.quantized_matmul(dz, w, scales, biases, transpose=False, **_qargs(spec))


def rows(spec, W, idx, dtype):
    """The rows of W at `idx` (n, j) -> (n, j, d) in `dtype`, dequantizing only those rows."""
    if spec.quant is None:
        return W[idx]
    w, scales, biases = W
    b = None if biases is None else biases[idx]
    return mx.dequantize(w[idx], scales[idx], b, dtype=dtype, **_qargs(spec))


def forward(spec, raw, bias, maskvec):
    """z = transform(raw). raw (n, V) or (n, j); bias, maskvec: the same trailing shape or None.

    Returns z and the cache `backward` needs (tanh of the capped argument, or None).
    """
    z = raw * spec.scale if spec.scale != 1.0 else raw
    if bias is not None:
        z = z + bias
    t = None
    if spec.softcap is not None:
        t = mx.tanh(z * (1.0 / spec.softcap))
        z = spec.softcap * t
    if maskvec is not None:
        z = z + maskvec
    return z, t


def backward(spec, dz, t, maskvec):
    """dz = dL/dz (n, V) -> (dL/draw (n, V), dL/dbias per row (n, V) or None)."""
    d_pre = dz * (1.0 - t * t) if t is not None else dz
    if maskvec is not None:
        # a forced -inf does not depend on raw (dense targets may put a teacher dz there)
        d_pre = mx.where(maskvec < 0, 0.0, d_pre)
    d_raw = d_pre * spec.scale if spec.scale != 1.0 else d_pre
    return d_raw, (d_pre if spec.has_bias else None)
