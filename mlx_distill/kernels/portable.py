"""Portable fused linear + distillation loss in plain MLX: token chunks, hand-written VJP.

Notation (per row): `s = z / T` with `z = h @ W.T` (fp32, float64 for float64 inputs), student
`q = softmax(s)`. Sparse targets are classes: the deduplicated teacher ids `K` plus one tail class
(every other id). The tail's log-sum-exp is taken over the logits with `K` set to `-inf`, so
`q_tail` is exact even when `sum_K q` rounds to 1. Every loss here has the gradient form
`ds_j = q_j * (g_j - G)` with `g_c = dL/dq_c` per class and `G = sum_c q_c g_c`: a per-row
coefficient on the tail softmax plus a k-sparse term on `K` (kernels.md section 6).

Two strategies share one chunk function:
- gradient in forward (default): each chunk's `dz` is formed right after its logits, so training
  costs 3 matmuls and 1 exp pass per chunk; the VJP only scales by the upstream cotangent.
- recompute: forward computes the loss only (1 matmul); the VJP recomputes the chunk with its
  gradient. Used for evaluation (`kernels.forward_only()`), where gradients are never wanted.

The graph is built so that MLX evaluates the chunks one after the other and frees each chunk's
(n, V) temporaries before the next chunk's logits exist (see `run_chunks`): peak extra memory is
O(chunk x V), never O(N x V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from mlx_distill.kernels import head

NEG_INF = float("-inf")
# Reverse KL's tail bucket: cached log-probs that sum to >= 1 (rounding) would give p_tail = 0 and
# an infinite loss; below fp32 resolution of 1 - P the teacher tail is unknown, so floor it there.
RKL_TAIL_FLOOR = 2.0**-23


@dataclass(frozen=True)
class Spec:
    """Everything static about one `distill_loss` call (closed over by the custom function)."""

    kind: str  # forward_kl | reverse_kl | jsd | tvd | ce
    targets: str  # sparse | dense | none
    temperature: float
    beta: float
    tail: str  # bucket | ignore
    kd_weight: float  # weight of the KD term; 0 when there is no KD term
    has_labels: bool
    chunk: int
    grad_in_forward: bool
    # The head (see `Head`): logits transform and quantization; defaults = plain `h @ W.T`.
    scale: float = 1.0
    softcap: float | None = None
    has_bias: bool = False
    masked: bool = False
    quant: tuple | None = None  # (group_size, bits, mode) for a QuantizedWeight
    # False for a frozen head (LoRA elsewhere): no (V, d) dW is formed, its cotangent is zero.
    weight_grad: bool = True
    # A LoRA-adapted head: logits += u @ b.T per chunk (`LowRank`), gradients to u and b.
    low_rank: bool = False

    @property
    def forms_dW(self) -> bool:
        return self.quant is None and self.weight_grad

    @property
    def plain_head(self) -> bool:
        """A dense head without transform: today's exact arithmetic (the quickstart's)."""
        return (
            self.scale == 1.0
            and self.softcap is None
            and not self.has_bias
            and not self.masked
            and self.quant is None
            and not self.low_rank
        )


def _dedupe(ids: mx.array, lp: mx.array) -> tuple[mx.array, mx.array]:
    """Merge duplicate ids of each row into one class.

    ids, lp: (n, k). Returns `first` (n, k) bool, true at the first slot of each id whose merged
    probability is non-zero, and `lpm` (n, k): the merged log-prob of the slot's id.
    """
    k = ids.shape[-1]
    if k == 1:
        return lp > NEG_INF, lp
    eq = ids[:, :, None] == ids[:, None, :]  # (n, k, k)
    lpm = mx.logsumexp(mx.where(eq, lp[:, None, :], NEG_INF), axis=-1)
    earlier = mx.tril(mx.ones((k, k), dtype=mx.bool_), k=-1)  # [j, j'] = j' < j
    first = mx.logical_not(mx.any(eq & earlier, axis=-1)) & (lpm > NEG_INF)
    return first, lpm


def _masked_sum(cond: mx.array, x: mx.array) -> mx.array:
    return mx.sum(mx.where(cond, x, 0.0), axis=-1)


def _sparse_kd(spec: Spec, sK, lpm, first, lse, lse_t, S_t, r):
    """KD over the classes K + tail, in units of s. All (n, k) or (n,).

    Returns kd (n,), dsK (n, k) on the first slots, c_e (n,): the coefficient on the tail
    exponentials `e_t = exp(s_masked - m_t)` (so off-K `ds_i = c_e * e_t_i`), and P (n,).
    """
    logqK = sK - lse[:, None]
    qK = mx.where(first, mx.exp(logqK), 0.0)
    pK = mx.where(first, mx.exp(lpm), 0.0)
    P = mx.sum(pK, axis=-1)
    if spec.tail == "ignore":  # forward KL over K only (soft CE on raw teacher mass, minus H(p_K))
        kd = _masked_sum(first, pK * (lpm - logqK))
        return kd, P[:, None] * qK - pK, P * r, P

    tail = S_t > 0  # an empty tail (every id in K) has no class, whatever 1 - P rounds to
    p_t = mx.where(tail, mx.maximum(1.0 - P, 0.0), 0.0)
    logq_t = lse_t - lse
    q_t = mx.exp(logq_t)
    kind, beta = spec.kind, spec.beta
    if kind == "forward_kl":
        logp_t = mx.log(p_t)
        kd = _masked_sum(first, pK * (lpm - logqK)) + mx.where(
            p_t > 0, p_t * (logp_t - logq_t), 0.0
        )
        ptot = P + p_t
        # off K: q_i (ptot - p_t / q_t) = ptot r e_i - p_t e_i / S_t: finite when q_t underflows
        c_e = ptot * r - mx.where(tail, p_t / mx.where(tail, S_t, 1.0), 0.0)
        return kd, ptot[:, None] * qK - pK, c_e, P
    if kind == "reverse_kl":
        logp_t = mx.log(mx.maximum(p_t, RKL_TAIL_FLOOR))
        aK = logqK - lpm
        a_t = logq_t - logp_t
        kd = _masked_sum(first, qK * aK) + mx.where(tail, q_t * a_t, 0.0)
        dsK = mx.where(first, qK * (aK - kd[:, None]), 0.0)
        c = mx.where(tail, a_t - kd, 0.0)
        return kd, dsK, c * r, P
    if kind == "jsd":
        lb, l1b = math.log(beta), math.log1p(-beta)
        logp_t = mx.log(p_t)
        logmK = mx.logaddexp(lb + lpm, l1b + logqK)
        logm_t = mx.logaddexp(lb + logp_t, l1b + logq_t)
        klqm = _masked_sum(first, qK * (logqK - logmK)) + mx.where(
            tail, q_t * (logq_t - logm_t), 0.0
        )
        klpm = _masked_sum(first, pK * (lpm - logmK)) + mx.where(
            p_t > 0, p_t * (logp_t - logm_t), 0.0
        )
        kd = beta * klpm + (1.0 - beta) * klqm
        dsK = mx.where(first, (1.0 - beta) * qK * (logqK - logmK - klqm[:, None]), 0.0)
        c = mx.where(tail, (1.0 - beta) * (logq_t - logm_t - klqm), 0.0)
        return kd, dsK, c * r, P
    # tvd: sigma = 1/2 sign(q - p) is the (sub)gradient of 1/2 |q - p|
    sigK = 0.5 * mx.sign(qK - pK)
    sig_t = 0.5 * mx.sign(q_t - p_t)
    S = _masked_sum(first, qK * sigK) + mx.where(tail, q_t * sig_t, 0.0)
    kd = 0.5 * (_masked_sum(first, mx.abs(qK - pK)) + mx.where(tail, mx.abs(q_t - p_t), 0.0))
    dsK = mx.where(first, qK * (sigK - S[:, None]), 0.0)
    c = mx.where(tail, sig_t - S, 0.0)
    return kd, dsK, c * r, P


def gathered_logits(hs, Wc, ids, y):
    """s at the teacher ids and the label, (n, k [+ 1]), from rows of W (not from s).

    Reading them off `s` would keep `s` referenced until the end of the chunk, and MLX could then
    not mask it in place: one more (n, V) buffer and a copy pass per chunk.
    """
    idx = [x for x in (ids, None if y is None else y[:, None]) if x is not None]
    if not idx:
        return None
    idx = mx.concatenate(idx, axis=1) if len(idx) > 1 else idx[0]
    return (Wc[idx] @ hs[:, :, None])[..., 0]


def sparse_chunk(spec: Spec, rows, s, g, ids, lp, y, w, want_grad: bool):
    """One chunk with sparse targets or labels only.

    s: (n, V) student logits / T; g: `gathered_logits` (n, k [+ 1]) or None; ids, lp: (n, k) or
    None; y: (n,) int or None; w: (n,) row weights (mask / count). Returns sums (4,) = weighted
    [loss, ce, kd, covered] and dz (n, V) = dloss/dz (or None).
    """
    n = s.shape[0]
    T = spec.temperature
    keep = w > 0
    ridx = mx.arange(n)[:, None]
    if ids is not None:
        first, lpm = _dedupe(ids, lp)
        sK = g[:, : ids.shape[1]]
        s_m = s.at[ridx, ids].add(mx.where(first, NEG_INF, 0.0).astype(s.dtype))
    else:
        s_m = s
    need_z = spec.has_labels and T != 1.0
    st = rows.stats(s_m, T if need_z else None)
    lse_t = st.m + mx.log(st.S)
    if ids is not None:
        lse = mx.logaddexp(lse_t, mx.logsumexp(mx.where(first, sK, NEG_INF), axis=-1))
    else:
        lse = lse_t
    r = mx.exp(st.m - lse)  # turns e_t into q

    zero = mx.zeros((n,), dtype=s.dtype)
    loss, ce, kd, cov = zero, zero, zero, zero
    coef_e, coef_z, dK = zero, zero, None
    if ids is not None:
        kd_s, dsK, c_e, P = _sparse_kd(spec, sK, lpm, first, lse, lse_t, st.S, r)
        kd = (T * T) * kd_s
        cov = P
        loss = spec.kd_weight * kd
        # d(T^2 KD)/dz = T * d KD / ds
        scale = mx.where(keep, (spec.kd_weight * T) * w, 0.0)
        coef_e = mx.where(keep, scale * c_e, 0.0)
        dK = mx.where(keep[:, None], scale[:, None] * dsK, 0.0)
    if spec.has_labels:
        s_y = g[:, -1]
        if T == 1.0:
            lse_z, z_y = lse, s_y
            soft_e, soft_K = r, (mx.exp(sK - lse[:, None]) if ids is not None else None)
        else:
            lse_zt = T * st.m + mx.log(st.Sz)
            if ids is not None:
                zK = T * sK
                lse_z = mx.logaddexp(lse_zt, mx.logsumexp(mx.where(first, zK, NEG_INF), axis=-1))
                soft_K = mx.exp(zK - lse_z[:, None])
            else:
                lse_z, soft_K = lse_zt, None
            z_y = T * s_y
            soft_e = mx.exp(T * st.m - lse_z)
        ce = lse_z - z_y
        a = 1.0 - spec.kd_weight
        loss = loss + a * ce
        a_w = mx.where(keep, a * w, 0.0)
        if T == 1.0:
            coef_e = coef_e + a_w * soft_e
        else:
            coef_z = a_w * soft_e
        if soft_K is not None:
            ceK = mx.where(first, a_w[:, None] * soft_K, 0.0)
            dK = ceK if dK is None else dK + ceK

    sums = mx.stack([_masked_sum(keep, w * x) for x in (loss, ce, kd, cov)])
    if not want_grad:
        return sums, None
    dz = rows.grad(s_m, st, coef_e, coef_z if need_z else None)
    # K slots hold 0 in the tail exponentials, so adding writes their value; the label's -1 rides
    # along in the same scatter.
    idx, vals = [], []
    if dK is not None:
        idx.append(ids)
        vals.append(dK)
    if spec.has_labels:
        idx.append(y[:, None])
        vals.append(-a_w[:, None])
    if idx:
        idx = mx.concatenate(idx, axis=1) if len(idx) > 1 else idx[0]
        vals = mx.concatenate(vals, axis=1) if len(vals) > 1 else vals[0]
        dz = dz.at[ridx, idx].add(vals.astype(dz.dtype))
    return sums, dz


def dense_chunk(spec: Spec, s, t, y, w, want_grad: bool):
    """One chunk with dense teacher logits t (n, V). Same contract as `sparse_chunk`."""
    n = s.shape[0]
    T, beta, kind = spec.temperature, spec.beta, spec.kind
    keep = w > 0
    u = t.astype(s.dtype) * (1.0 / T) if T != 1.0 else t.astype(s.dtype)
    logp = u - mx.logsumexp(u, axis=-1, keepdims=True)
    lse = mx.logsumexp(s, axis=-1, keepdims=True)
    logq = s - lse
    q = mx.exp(logq)
    p = mx.exp(logp)
    pos = p > 0  # teacher -inf logits: 0 log 0 = 0
    if kind == "forward_kl":
        kd = mx.sum(mx.where(pos, p * (logp - logq), 0.0), axis=-1)
        ds = q - p
    elif kind == "reverse_kl":
        a = logq - logp
        if spec.masked:  # ids forced to -inf: q = 0 there, and 0 * (-inf) must count as 0
            a = mx.where(q > 0, a, 0.0)
        kd = mx.sum(q * a, axis=-1)
        ds = q * (a - kd[:, None])
    elif kind == "jsd":
        logm = mx.logaddexp(math.log(beta) + logp, math.log1p(-beta) + logq)
        a = logq - logm
        if spec.masked:
            a = mx.where(q > 0, a, 0.0)
        klqm = mx.sum(q * a, axis=-1)
        klpm = mx.sum(mx.where(pos, p * (logp - logm), 0.0), axis=-1)
        kd = beta * klpm + (1.0 - beta) * klqm
        ds = (1.0 - beta) * q * (a - klqm[:, None])
    else:  # tvd
        sig = 0.5 * mx.sign(q - p)
        kd = 0.5 * mx.sum(mx.abs(q - p), axis=-1)
        ds = q * (sig - mx.sum(q * sig, axis=-1, keepdims=True))
    kd = (T * T) * kd
    loss = spec.kd_weight * kd
    zero = mx.zeros((n,), dtype=s.dtype)
    ce = zero
    scale = mx.where(keep, (spec.kd_weight * T) * w, 0.0)
    dz = scale[:, None] * ds if want_grad else None
    if spec.has_labels:
        z = T * s if T != 1.0 else s
        lse_z = lse[:, 0] if T == 1.0 else mx.logsumexp(z, axis=-1)
        ce = lse_z - mx.take_along_axis(z, y[:, None], axis=-1)[:, 0]
        a = 1.0 - spec.kd_weight
        loss = loss + a * ce
        if want_grad:
            a_w = mx.where(keep, a * w, 0.0)
            soft = q if T == 1.0 else mx.exp(z - lse_z[:, None])
            dz = dz + a_w[:, None] * soft
            dz = dz.at[mx.arange(n)[:, None], y[:, None]].add(-a_w[:, None])
    ones = mx.ones((n,), dtype=s.dtype)
    sums = mx.stack([_masked_sum(keep, w * x) for x in (loss, ce, kd, ones)])
    return sums, dz


def compute_dtype(*arrays: mx.array):
    """float64 when every float input is float64 (CPU checks); fp32 otherwise."""
    return mx.float64 if all(a.dtype == mx.float64 for a in arrays) else mx.float32


def _dz_times_w(dz: mx.array, Wc: mx.array) -> mx.array:
    """dh = dz @ W (n, d). OpenBLAS runs this GEMM 3-4x slower when n <= d than the same
    product written as (W^T dz^T)^T (measured on 2 cores, V = 32k: 25 vs 87 GFLOP/s at n = 448,
    d = 512; the other way round for n > d), so pick the form by shape on CPU."""
    n, d = dz.shape[0], Wc.shape[1]
    if mx.default_device() == mx.cpu and n <= d:
        return (Wc.T @ dz.T).T
    return dz @ Wc


def run_chunks(
    spec: Spec, rows, h, W, extras: list, want_grad: bool, bias=None, maskvec=None, low_rank=None
):
    """Loop over token chunks. h (N, d); W (V, d), or the quantized [weight, scales(, biases)]
    list when `spec.quant`; extras as packed by `loss.distill_loss`; bias, maskvec: (V,) or
    None (the head's transform, see `head.py`); low_rank: (u (N, r), b (V, r)) or None.

    Returns sums (4,) and, when `want_grad`, dh (N, d), dW (V, d) (None for a quantized W),
    dbias (V,) (None without bias) and (du (N, r), db (V, r)) (None without low_rank), in the
    compute dtype.
    """
    plain = spec.plain_head
    cd = compute_dtype(h, W) if spec.quant is None else mx.float32
    Wc = W.astype(cd) if plain else head.prepare_weight(spec, W, cd)
    bias_c = bias.astype(cd) if bias is not None else None
    mask_c = maskvec.astype(cd) if maskvec is not None else None
    u, b_lr = (None, None) if low_rank is None else (low_rank[0], low_rank[1].astype(cd))
    N = h.shape[0]
    T = spec.temperature
    sums, dW, dbias, dhs, dus, db_lr = None, None, None, [], [], None
    for a in range(0, N, spec.chunk):
        b = min(a + spec.chunk, N)
        hc = h[a:b].astype(cd)
        if sums is not None:
            # MLX schedules a graph breadth-first, which would interleave the chunks and keep
            # all their (n, V) buffers alive: start chunk c only after chunk c - 1 is done.
            # dW rides through the same node so that it keeps a single reader and the next
            # addmm updates it in place (a second reader would pin every dW buffer until the end).
            if dW is None:
                hc = mx.depends(hc, [sums] if not dhs else [sums, dhs[-1]])
            else:
                hc, dW = mx.depends([hc, dW], [sums, dhs[-1]])
        if plain:
            hs = hc * (1.0 / T) if T != 1.0 else hc
            s = hs @ Wc.T
        else:
            uc = None if u is None else u[a:b].astype(cd)
            z, cache = head.forward(spec, head.raw(spec, hc, Wc, uc, b_lr), bias_c, mask_c)
            s = z * (1.0 / T) if T != 1.0 else z
        part = [x[a:b] for x in extras]
        if spec.targets == "dense":
            t, w = part[0], part[-1].astype(cd)
            y = part[1] if spec.has_labels else None
            c_sums, dz = dense_chunk(spec, s, t, y, w, want_grad)
        else:
            if spec.targets == "sparse":
                ids, lp = part[0], part[1].astype(cd)
                part = part[2:]
            else:
                ids, lp = None, None
            y = part[0] if spec.has_labels else None
            w = part[-1].astype(cd)
            if plain:
                g = gathered_logits(hs, Wc, ids, y)
            else:
                g = _gathered_transformed(spec, hc, Wc, ids, y, bias_c, mask_c, uc, b_lr)
            c_sums, dz = sparse_chunk(spec, rows, s, g, ids, lp, y, w, want_grad)
        sums = c_sums if sums is None else sums + c_sums
        if not want_grad:
            continue
        if not plain:
            dz, d_pre = head.backward(spec, dz, cache, mask_c)
            if d_pre is not None:
                db = mx.sum(d_pre, axis=0)
                dbias = db if dbias is None else dbias + db
            if uc is not None:
                # the adapter's share: du = dz @ b (n, r), db += dz.T @ u (V, r); never (V, d)
                dus.append(dz @ b_lr)
                db_lr = dz.T @ uc if db_lr is None else mx.addmm(db_lr, dz.T, uc)
        if spec.quant is not None:
            dhs.append(head.matmul(spec, dz, Wc))
            continue
        dhs.append(_dz_times_w(dz, Wc))
        if not spec.weight_grad:
            continue
        dW = dz.T @ hc if dW is None else mx.addmm(dW, dz.T, hc)
    if not want_grad:
        return sums, None, None, None, None
    dh = mx.concatenate(dhs, axis=0) if len(dhs) > 1 else dhs[0]
    lr_grads = None
    if u is not None:
        lr_grads = (mx.concatenate(dus, axis=0) if len(dus) > 1 else dus[0], db_lr)
    return sums, dh, dW, dbias, lr_grads


def _gathered_transformed(spec: Spec, hc, Wc, ids, y, bias, maskvec, uc=None, b_lr=None):
    """`gathered_logits` for a transformed, quantized or low-rank head: s at the ids and the
    label."""
    idx = [x for x in (ids, None if y is None else y[:, None]) if x is not None]
    if not idx:
        return None
    idx = mx.concatenate(idx, axis=1) if len(idx) > 1 else idx[0]
    raw = (head.rows(spec, Wc, idx, hc.dtype) @ hc[:, :, None])[..., 0]
    if uc is not None:
        raw = raw + (b_lr[idx] @ uc[:, :, None])[..., 0]
    z, _ = head.forward(
        spec,
        raw,
        None if bias is None else bias[idx],
        None if maskvec is None else maskvec[idx],
    )
    T = spec.temperature
    return z * (1.0 / T) if T != 1.0 else z


def fused_loss(
    spec: Spec, rows, h: mx.array, W, extras: list, bias=None, maskvec=None, low_rank=None
):
    """(loss, ce, kd, covered) scalars with a hand-written VJP to h, W, bias and the low-rank
    term only.

    W: (V, d), or the quantized [weight, scales(, biases)] list (it gets zero cotangents: a
    quantized head is frozen). bias, maskvec: (V,) or None. low_rank: [u (N, r), b (V, r)] or
    None.
    """
    head_in = [x for x in (bias, maskvec) if x is not None] + list(low_rank or [])

    def unpack(head_in):
        it = iter(head_in)
        b = next(it) if bias is not None else None
        m = next(it) if maskvec is not None else None
        lr = (next(it), next(it)) if low_rank is not None else None
        return b, m, lr

    # Outputs: [dW, dh, dbias, du, db,] loss, ce, kd, covered (gradient entries that exist).
    # Evaluating the loss evaluates them all: they are all inputs of MLX's custom-function node.
    @mx.custom_function
    def f(h, W, head_in, extras):
        sums, dh, dW, db, lr = run_chunks(
            spec, rows, h, W, extras, spec.grad_in_forward, *unpack(head_in)
        )
        outs = (sums[0], sums[1], sums[2], sums[3])
        if spec.grad_in_forward:
            grads = (dW, dh, db) + (lr if lr is not None else ())
            outs = tuple(mx.stop_gradient(g) for g in grads if g is not None) + outs
        return outs

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        h, W, head_in, extras = primals
        if spec.grad_in_forward:
            grads = list(outputs[:-4])
            dW = grads.pop(0) if spec.forms_dW else None
            dh = grads.pop(0)
            db = grads.pop(0) if bias is not None else None
            lr = (grads.pop(0), grads.pop(0)) if low_rank is not None else None
            g = cotangents[-4]
        else:
            g = cotangents[0]
            _, dh, dW, db, lr = run_chunks(spec, rows, h, W, extras, True, *unpack(head_in))
        g = g.astype(dh.dtype)
        if spec.forms_dW:
            dW_out = (g * dW).astype(W.dtype)
        elif spec.quant is None:
            dW_out = mx.zeros_like(W)
        else:
            dW_out = [mx.zeros_like(x) for x in W]
        b_in, m_in, lr_in = unpack(head_in)
        head_out = []
        if bias is not None:
            head_out.append((g * db).astype(b_in.dtype))
        if maskvec is not None:
            head_out.append(mx.zeros_like(m_in))
        if low_rank is not None:
            head_out += [(g * d).astype(x.dtype) for d, x in zip(lr, lr_in)]
        return ((g * dh).astype(h.dtype), dW_out, head_out, [mx.zeros_like(e) for e in extras])

    return f(h, W, head_in, extras)[-4:]
