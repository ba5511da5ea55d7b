"""`bench_loss`: fused vs naive (materialized logits + autograd) loss and gradients.

Both compute the same loss: forward KL against k = 20 sparse teacher targets with a tail bucket,
mixed 50/50 with hard-label cross-entropy, T = 1, 10% of tokens masked, fp32. The caller sets up
the backend (`mlx_distill.backend.setup()`) before importing mlx.
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

from mlx_distill.kernels.loss import distill_loss
from mlx_distill.kernels.targets import SparseTargets

K = 20
KD_WEIGHT = 0.5
NAIVE_LIMIT_BYTES = 15 * 10**9  # the "naive would need > 15 GB" threshold


def _inputs(N: int, V: int, d: int):
    h = mx.random.normal((N, d))
    W = mx.random.normal((V, d)) * (d**-0.5)
    # k distinct ids per row (the naive loss below does not merge duplicates)
    start = mx.random.randint(0, V, (N, 1))
    ids = ((start + mx.arange(K)[None, :] * (V // K)) % V).astype(mx.int32)
    # teacher covers 90% of its mass with the k ids
    lp = mx.log(mx.array(0.9)) + mx.log(mx.softmax(2.0 * mx.random.normal((N, K)), axis=-1))
    labels = mx.random.randint(0, V, (N,)).astype(mx.int32)
    mask = mx.random.uniform(shape=(N,)) < 0.9
    mx.eval(h, W, ids, lp, labels, mask)
    return h, W, ids, lp, labels, mask


def naive_loss(h, W, ids, lp, labels, mask):
    """The same loss with materialized (N, V) logits, log_softmax and autograd."""
    z = h @ W.T
    logq = z - mx.logsumexp(z, axis=-1, keepdims=True)
    logqK = mx.take_along_axis(logq, ids, axis=-1)
    pK = mx.exp(lp)
    p_t = mx.maximum(1.0 - mx.sum(pK, axis=-1), 0.0)
    logq_t = mx.log1p(-mx.sum(mx.exp(logqK), axis=-1))
    kd = mx.sum(pK * (lp - logqK), axis=-1) + p_t * (mx.log(p_t) - logq_t)
    ce = -mx.take_along_axis(logq, labels[:, None], axis=-1)[:, 0]
    row = (1 - KD_WEIGHT) * ce + KD_WEIGHT * kd
    keep = mask.astype(mx.float32)
    return mx.sum(row * keep) / mx.maximum(mx.sum(keep), 1.0)


def fused_loss(h, W, ids, lp, labels, mask):
    loss, _ = distill_loss(
        h, W, SparseTargets(ids, lp), labels=labels, mask=mask, kd_weight=KD_WEIGHT
    )
    return loss


def _peak(step, args) -> int:
    """Peak bytes above the live inputs during one loss + gradients evaluation."""
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(step(*args))
    peak = mx.get_peak_memory() - base
    mx.clear_cache()
    return int(peak)


def _measure(fns: dict, args, repeats: int) -> dict:
    """Median seconds of loss + gradients and peak bytes, for each function in `fns`.

    After one warm-up each, the timed runs alternate between the functions, so that load from
    other processes on a shared machine falls on both alike.
    """
    steps = {name: mx.value_and_grad(fn, argnums=(0, 1)) for name, fn in fns.items()}
    out = {}
    for name, step in steps.items():
        out[name] = {"peak_bytes": _peak(step, args)}  # doubles as the warm-up
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            mx.eval(step(*args))
            times[name].append(time.perf_counter() - t0)
    for name in steps:
        out[name] = {"seconds": statistics.median(times[name]), **out[name]}
    return out


def _naive_peak_estimate(V: int, d: int, N: int) -> int:
    """Naive peak at N tokens, extrapolated linearly from measured runs at 128 and 256 tokens."""
    peaks = []
    for n in (128, 256):
        args = _inputs(n, V, d)
        step = mx.value_and_grad(naive_loss, argnums=(0, 1))
        mx.eval(step(*args))
        peaks.append(_peak(step, args))
        del args
    per_token = max(peaks[1] - peaks[0], 0) / 128
    return max(int(peaks[0] + per_token * (N - 128)), min(peaks), 1)


def bench_loss(size: tuple[int, int, int] = (4096, 32768, 512), repeats: int = 5) -> dict:
    """Time and memory of loss + gradients, fused vs naive, at size (N, V, d).

    Times are medians of `repeats` runs after a warm-up, alternating naive and fused runs.

    Returns {"size", "backend", "naive": {"seconds", "peak_bytes"}, "fused": {...},
    "memory_ratio", "time_ratio"}. When the naive path would need more than 15 GB it is not run:
    naive then holds "skipped" (the reason), "seconds": None and an "estimated_peak_bytes"
    extrapolated from measured small runs; memory_ratio uses that estimate, time_ratio is None.
    """
    from mlx_distill.kernels.selfcheck import backend_label

    N, V, d = (int(x) for x in size)
    repeats = max(int(repeats), 1)
    out: dict = {"size": [N, V, d], "backend": backend_label()}
    estimate = _naive_peak_estimate(V, d, N)
    args = _inputs(N, V, d)
    if estimate > NAIVE_LIMIT_BYTES:
        naive = {
            "seconds": None,
            "peak_bytes": None,
            "skipped": f"needs ~{estimate / 1e9:.1f} GB (> 15 GB): not run",
            "estimated_peak_bytes": estimate,
        }
        fused = _measure({"fused": fused_loss}, args, repeats)["fused"]
    else:
        both = _measure({"naive": naive_loss, "fused": fused_loss}, args, repeats)
        naive, fused = both["naive"], both["fused"]
    out["naive"], out["fused"] = naive, fused
    naive_bytes = naive["peak_bytes"] if naive["peak_bytes"] is not None else estimate
    out["memory_ratio"] = fused["peak_bytes"] / naive_bytes
    out["time_ratio"] = (
        fused["seconds"] / naive["seconds"] if naive["seconds"] is not None else None
    )
    return out
