"""Float64 NumPy reference for `distill_loss`, written from the definitions (no shared code).

Values follow the issue's formulas on materialized logits; gradients are central finite
differences of the reference loss with respect to the logits `z` (then `dh = dz W`,
`dW = dz^T h`, exact for a linear head).
"""

from __future__ import annotations

import numpy as np

RKL_TAIL_FLOOR = 2.0**-23


def _lse(x: np.ndarray) -> np.ndarray:
    """log-sum-exp over the last axis; -inf for an all -inf row."""
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def _xlogy_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a * log(a / b) with 0 log 0 = 0 (elementwise)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0)


def _divergence(kind: str, p: np.ndarray, q: np.ndarray, beta: float) -> np.ndarray:
    """Sum over the last axis of the divergence between class distributions p, q (..., C)."""
    if kind == "forward_kl":
        return np.sum(_xlogy_div(p, q), axis=-1)
    if kind == "reverse_kl":
        return np.sum(_xlogy_div(q, p), axis=-1)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * np.sum(_xlogy_div(p, m), axis=-1) + (1 - beta) * np.sum(_xlogy_div(q, m), -1)
    if kind == "tvd":
        return 0.5 * np.sum(np.abs(p - q), axis=-1)
    raise ValueError(kind)


def row_kd(Z, target, kind, beta, T, tail):
    """KD (without T^2) of logit rows Z (M, V) against one token's target.

    target: ("sparse", ids (k,), logprobs (k,)) or ("dense", teacher logits (V,)).
    """
    S = Z / T
    logq = S - _lse(S)[:, None]
    q = np.exp(logq)
    V = Z.shape[1]
    if target[0] == "dense":
        t = target[1] / T
        p = np.exp(t - _lse(t[None])[0])
        return _divergence(kind, np.broadcast_to(p, q.shape), q, beta)
    _, ids, lps = target
    mass: dict[int, float] = {}
    for i, lp in zip(ids.tolist(), lps.tolist()):
        if lp > -np.inf:
            mass[i] = mass.get(i, 0.0) + float(np.exp(lp))
    K = sorted(mass)
    pK = np.array([mass[i] for i in K])
    qK = q[:, K]
    if tail == "ignore":
        return np.sum(_xlogy_div(np.broadcast_to(pK, qK.shape), qK), axis=-1)
    out = np.ones(V, dtype=bool)
    out[K] = False
    if not out.any():  # no tail class at all
        return _divergence(kind, np.broadcast_to(pK, qK.shape), qK, beta)
    p_t = max(0.0, 1.0 - pK.sum())
    if kind == "reverse_kl":
        p_t = max(p_t, RKL_TAIL_FLOOR)
    q_t = np.exp(_lse(S[:, out]) - _lse(S))  # computed from the tail itself (stable)
    P = np.broadcast_to(np.append(pK, p_t), (Z.shape[0], len(K) + 1))
    Q = np.concatenate([qK, q_t[:, None]], axis=1)
    return _divergence(kind, P, Q, beta)


def covered(target) -> float:
    if target is None:
        return 0.0
    if target[0] == "dense":
        return 1.0
    _, ids, lps = target
    return float(np.sum(np.exp(lps[lps > -np.inf])))


def row_loss(Z, target, label, kind, beta, T, tail, kd_weight):
    """Per-row loss, ce, kd (with T^2) for logit rows Z (M, V)."""
    M = Z.shape[0]
    ce = (_lse(Z) - Z[:, label]) if label is not None else np.zeros(M)
    if kind == "ce":
        return ce, ce, np.zeros(M)
    kd = T * T * row_kd(Z, target, kind, beta, T, tail)
    if label is None:
        return kd, ce, kd
    return (1 - kd_weight) * ce + kd_weight * kd, ce, kd


def _row_target(targets, r):
    if targets is None:
        return None
    if targets[0] == "dense":
        return ("dense", targets[1][r])
    return ("sparse", targets[1][r], targets[2][r])


def reference(
    h,
    W,
    targets,
    *,
    kind="forward_kl",
    beta=0.5,
    T=1.0,
    tail="bucket",
    labels=None,
    kd_weight=1.0,
    mask=None,
    grads=True,
    eps=1e-5,
    transform=None,
):
    """Float64 loss, metrics and (dh, dW) [and dbias, with a transform].

    transform: None, or {"scale", "softcap", "bias" (V,), "masked" (ids)}: logits
    z = softcap(scale * h W^T + bias) with the masked ids at -inf; then (dh, dW, dbias) by the
    chain rule from the finite-difference dz.

    h (N, d), W (V, d); targets None, ("sparse", ids (N, k), logprobs (N, k)) or
    ("dense", logits (N, V)); labels (N,) or None; mask (N,) bool or None.
    Returns (loss, {"ce", "kd", "covered_mass"}, dh, dW).
    """
    h = np.asarray(h, np.float64)
    W = np.asarray(W, np.float64)
    z = h @ W.T
    if transform is not None:
        pre = transform.get("scale", 1.0) * z
        if transform.get("bias") is not None:
            pre = pre + np.asarray(transform["bias"], np.float64)
        c = transform.get("softcap")
        z = c * np.tanh(pre / c) if c else pre
        dpre = (1 - np.tanh(pre / c) ** 2) if c else np.ones_like(z)
        masked = list(transform.get("masked", ()))
        z[:, masked] = -np.inf
        dpre[:, masked] = 0.0
    N, V = z.shape
    keep = np.ones(N, bool) if mask is None else np.asarray(mask, bool)
    count = max(int(keep.sum()), 1)
    loss = ce_m = kd_m = cov = 0.0
    dz = np.zeros_like(z)
    for r in np.nonzero(keep)[0]:
        tgt = _row_target(targets, r)
        label = None if labels is None else int(labels[r])

        def f(Zr, tgt=tgt, label=label):
            return row_loss(Zr, tgt, label, kind, beta, T, tail, kd_weight)

        lr, cr, kr = f(z[r][None])
        loss += lr[0] / count
        ce_m += cr[0] / count
        kd_m += kr[0] / count
        cov += covered(tgt) / count
        if grads:
            E = np.eye(V) * eps
            plus = f(z[r][None] + E)[0]
            minus = f(z[r][None] - E)[0]
            dz[r] = (plus - minus) / (2 * eps) / count
    metrics = {"ce": ce_m, "kd": kd_m, "covered_mass": cov}
    if transform is None:
        return loss, metrics, dz @ W, dz.T @ h
    dz = np.nan_to_num(dz * dpre)  # a masked logit is a constant: no gradient through it
    dpre_sum = dz.sum(axis=0)
    draw = dz * transform.get("scale", 1.0)
    return loss, metrics, draw @ W, draw.T @ h, dpre_sum
