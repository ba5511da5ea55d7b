"""`distill_loss`: the public fused linear + distillation loss (checks, chunk size, dispatch)."""

from __future__ import annotations

import contextlib
import contextvars
import math

import mlx.core as mx

from mlx_distill.errors import BadInput
from mlx_distill.kernels.portable import Spec, fused_loss
from mlx_distill.kernels.selfcheck import rows_for
from mlx_distill.kernels.targets import (
    DenseTargets,
    LogitTransform,
    LowRank,
    QuantizedWeight,
    SparseTargets,
)

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "ce")
TAILS = ("bucket", "ignore")
# Bytes of (chunk, V) temporaries a chunk may hold. On CPU the backward matmuls (inner
# dimension = chunk) need ~500 rows to run near full BLAS speed; 224 MB gives 448 at V = 32k.
CHUNK_BUDGET = {"cpu": 224 << 20, "gpu": 1 << 30}
MIN_ROWS = 256

_grad_in_forward = contextvars.ContextVar("mlx_distill_grad_in_forward", default=True)


@contextlib.contextmanager
def forward_only():
    """Inside this block `distill_loss` does not form gradients during the forward pass.

    Use it for evaluation: the forward then costs one matmul per chunk instead of three.
    Gradients, if taken anyway, are still exact (the VJP recomputes each chunk).
    """
    token = _grad_in_forward.set(False)
    try:
        yield
    finally:
        _grad_in_forward.reset(token)


def choose_chunk(
    n_rows: int, vocab: int, itemsize: int, dense: bool, extra_exp: bool, transformed: bool = False
) -> int:
    """Rows per chunk so that the chunk's (rows, V) temporaries fit `CHUNK_BUDGET`."""
    on_gpu = mx.default_device() == mx.gpu
    budget = CHUNK_BUDGET["gpu" if on_gpu else "cpu"]
    # Measured: ~2.5 (n, V) buffers live per sparse chunk (+1 for CE at T != 1, ~6 for dense);
    # a head transform keeps the raw logits' tanh and their gradient besides (+2).
    arrays = (7 if dense else 4) + (1 if extra_exp else 0) + (2 if transformed else 0)
    rows = budget // (arrays * vocab * itemsize)
    # Never below MIN_ROWS: thinner chunks make the matmuls slow (at V = 152k that is ~0.4 GB).
    rows = max(MIN_ROWS, rows - rows % 8)
    return int(min(rows, n_rows))


def _fail(msg: str):
    raise BadInput(f"distill_loss: {msg}")


def _is_int(a: mx.array) -> bool:
    return mx.issubdtype(a.dtype, mx.integer)


def _check_head(weight, transform, d: int) -> None:
    if isinstance(weight, QuantizedWeight):
        if weight.shape[1] != d or weight.scales.shape[0] != weight.shape[0]:
            _fail(f"quantized weight must be (V, d={d}), got {weight.shape}")
    elif not isinstance(weight, mx.array) or weight.ndim != 2 or weight.shape[1] != d:
        _fail(f"weight must be (V, d={d}), got {getattr(weight, 'shape', None)}")
    elif not mx.issubdtype(weight.dtype, mx.floating):
        _fail("hidden and weight must be floating point")
    if transform is None:
        return
    if not isinstance(transform, LogitTransform):
        _fail(f"transform must be a LogitTransform or None, got {type(transform).__name__}")
    V = weight.shape[0]
    if not (math.isfinite(transform.scale) and transform.scale > 0):
        _fail(f"transform scale must be a positive number, got {transform.scale!r}")
    c = transform.softcap
    if c is not None and not (isinstance(c, int | float) and math.isfinite(c) and c > 0):
        _fail(f"transform softcap must be a positive number or None, got {c!r}")
    if transform.bias is not None and tuple(transform.bias.shape) != (V,):
        _fail(f"transform bias must be ({V},), got {transform.bias.shape}")
    if any(not 0 <= i < V for i in transform.masked_ids):
        _fail(f"transform masked_ids must lie in 0..{V - 1}")


def _check_args(hidden, weight, targets, kind, beta, temperature, tail, labels, kd_weight, mask):
    if not isinstance(hidden, mx.array) or hidden.ndim not in (2, 3):
        _fail(f"hidden must be (N, d) or (B, L, d), got shape {getattr(hidden, 'shape', None)}")
    if not mx.issubdtype(hidden.dtype, mx.floating):
        _fail("hidden and weight must be floating point")
    lead = tuple(hidden.shape[:-1])
    V = weight.shape[0]
    if hidden.size == 0 or V == 0:
        _fail(f"empty input: hidden {hidden.shape}, weight {weight.shape}")
    if kind not in KINDS:
        _fail(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if tail not in TAILS:
        _fail(f"tail must be 'bucket' or 'ignore', got {tail!r}")
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        _fail(f"temperature must be a positive number, got {temperature!r}")
    if kind == "jsd" and not (0.0 < beta < 1.0):
        _fail(f"jsd needs 0 < beta < 1, got {beta!r}")
    if not (0.0 <= kd_weight <= 1.0):
        _fail(f"kd_weight must be in [0, 1], got {kd_weight!r}")
    if kind == "ce":
        if targets is not None:
            _fail("kind='ce' takes targets=None (plain cross-entropy on labels)")
        if labels is None:
            _fail("kind='ce' needs labels")
    elif targets is None:
        _fail(f"kind={kind!r} needs targets (SparseTargets or DenseTargets)")
    if isinstance(targets, SparseTargets):
        ids, lp = targets.ids, targets.logprobs
        if ids.ndim != len(lead) + 1 or tuple(ids.shape[:-1]) != lead or ids.shape != lp.shape:
            _fail(
                f"sparse targets must be {lead + ('k',)} ids and logprobs, "
                f"got {ids.shape}, {lp.shape}"
            )
        if ids.shape[-1] < 1:
            _fail("sparse targets need k >= 1")
        if not _is_int(ids) or not mx.issubdtype(lp.dtype, mx.floating):
            _fail("sparse targets need integer ids and float logprobs")
        if tail == "ignore" and kind != "forward_kl":
            _fail(f"tail='ignore' is only defined for forward_kl, not {kind!r}")
    elif isinstance(targets, DenseTargets):
        if tuple(targets.logits.shape) != lead + (V,):
            _fail(f"dense targets must be {lead + (V,)} logits, got {targets.logits.shape}")
    elif targets is not None:
        _fail(f"targets must be SparseTargets, DenseTargets or None, got {type(targets).__name__}")
    if labels is not None and (tuple(labels.shape) != lead or not _is_int(labels)):
        _fail(f"labels must be {lead} integer ids, got {labels.shape} {labels.dtype}")
    if mask is not None and tuple(mask.shape) != lead:
        _fail(f"mask must be {lead}, got {mask.shape}")


def distill_loss(
    hidden: mx.array,
    weight: mx.array | QuantizedWeight,
    targets: SparseTargets | DenseTargets | None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: str = "bucket",
    labels: mx.array | None = None,
    kd_weight: float = 1.0,
    mask: mx.array | None = None,
    chunk_size: int | None = None,
    rows=None,
    transform: LogitTransform | None = None,
    weight_grad: bool = True,
    low_rank: LowRank | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Fused LM head + distillation loss; never materializes the (N, V) logits.

    Args:
        hidden: (N, d) or (B, L, d) student hidden states. weight: (V, d) LM-head (or tied
            embedding) weight, or a `QuantizedWeight` (multiplied quantized, never dequantized
            whole; it gets no gradient). Logits `z = hidden @ weight.T` are computed in fp32.
        targets: SparseTargets(ids, logprobs) of shape (..., k) (log-probs already at
            `temperature`; -inf marks an empty slot; duplicate ids are merged), DenseTargets(logits)
            of shape (..., V), or None with kind="ce".
        kind: forward_kl = KL(p||q), reverse_kl = KL(q||p), jsd (generalized, `beta`), tvd, ce.
        temperature: q = softmax(z / T), dense p = softmax(t / T); the KD term is multiplied by T^2.
        tail: sparse only. "bucket" adds one class for all other ids (p_tail = max(0, 1 - sum p),
            q_tail exact); "ignore" (forward_kl only) uses the k ids alone. Reverse KL floors
            p_tail at 2^-23 (cached top-k that sum to 1 would otherwise make the loss infinite).
        labels: (...,) int ids. With labels, loss = (1 - kd_weight) * CE(T=1) + kd_weight * KD;
            without, loss = KD (kd_weight unused).
        mask: (...,) bool; the loss is the mean over unmasked tokens (0, with zero gradients,
            when every token is masked). Ids/labels of masked tokens are never read.
        chunk_size: tokens per chunk; None picks it from a memory budget (`choose_chunk`).
        rows: the row pass (`rows.PortableRows` or a native one); None uses the one verified on
            this machine (`selfcheck.rows_for`). The self-check passes each candidate here.
        transform: the architecture's logits transform (`LogitTransform`: scale, final softcap,
            bias, ids forced to -inf), applied to `z` inside each chunk with its gradient.
            `models.lm_head(model)` gives weight and transform for a loaded mlx-lm model.
        weight_grad: False when the head is frozen (a LoRA student whose head is not adapted):
            the (V, d) head gradient is then never formed (one matmul per chunk and a (V, d)
            fp32 buffer saved) and the weight's cotangent is zero.
        low_rank: a LoRA-adapted head's low-rank term, `LowRank(u (..., r), b (V, r))`:
            logits = hidden @ weight.T + u @ b.T, added chunk by chunk (the adapted matrix is
            never formed; `weight` is the frozen base, dense or quantized, with
            weight_grad=False). Gradients flow to u and b. `models.lm_head(model).low_rank`.

    Returns:
        (loss, metrics): scalar loss, and {"ce", "kd", "covered_mass"}: means over unmasked
        tokens of the CE term (0 without labels), the KD term including T^2 (0 for kind="ce")
        and the teacher mass on the sparse ids (1 for dense targets, 0 without targets).
        Metrics carry no gradient.

    Gradients flow to `hidden`, `weight`, the transform's bias and `low_rank` only, through a
    hand-written VJP (first order; no jvp/vmap). Works under `mx.value_and_grad` and inside
    `mx.compile` (tested). By default gradients are formed during the forward pass (fastest
    for training); wrap evaluation-only calls in `forward_only()` to skip that work. Peak extra
    memory is O(chunk x V).
    """
    if isinstance(hidden, mx.array) and hidden.ndim in (2, 3):
        _check_head(weight, transform, hidden.shape[-1])
    _check_args(hidden, weight, targets, kind, beta, temperature, tail, labels, kd_weight, mask)
    _check_low_rank(low_rank, hidden, weight)
    if transform is not None and transform.is_identity:
        transform = None
    quantized = isinstance(weight, QuantizedWeight)
    d = hidden.shape[-1]
    V = weight.shape[0]
    h2 = hidden.reshape(-1, d)
    N = h2.shape[0]
    has_kd = kind != "ce"
    T = float(temperature) if has_kd else 1.0
    has_labels = labels is not None

    if mask is None:
        keep = mx.ones((N,), dtype=mx.bool_)
    else:
        keep = mask.reshape(N).astype(mx.bool_)
    f64 = not quantized and hidden.dtype == mx.float64 and weight.dtype == mx.float64
    cd = mx.float64 if f64 else mx.float32
    count = mx.maximum(mx.sum(keep.astype(cd)), 1.0)
    w = keep.astype(cd) / count

    extras = []
    if isinstance(targets, SparseTargets):
        k = targets.ids.shape[-1]
        lp = targets.logprobs.reshape(N, k)
        # Empty slots and masked rows: point at id 0 so no out-of-range id is ever read.
        live = keep[:, None] & (lp > float("-inf"))
        extras += [mx.where(live, targets.ids.reshape(N, k).astype(mx.int32), 0), lp]
        ttype = "sparse"
    elif isinstance(targets, DenseTargets):
        extras.append(targets.logits.reshape(N, V))
        ttype = "dense"
    else:
        ttype = "none"
    if has_labels:
        extras.append(mx.where(keep, labels.reshape(N).astype(mx.int32), 0))
    extras.append(w)

    if chunk_size is None:
        itemsize = 8 if cd == mx.float64 else 4
        chunk = choose_chunk(
            N,
            V,
            itemsize,
            ttype == "dense",
            has_labels and T != 1.0,
            transformed=transform is not None or quantized or low_rank is not None,
        )
    else:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            _fail(f"chunk_size must be a positive int, got {chunk_size!r}")
        chunk = min(chunk_size, N)

    spec = Spec(
        kind=kind,
        targets=ttype,
        temperature=T,
        beta=float(beta),
        tail=tail,
        kd_weight=(float(kd_weight) if has_labels else 1.0) if has_kd else 0.0,
        has_labels=has_labels,
        chunk=max(chunk, 1),
        grad_in_forward=_grad_in_forward.get(),
        weight_grad=bool(weight_grad),
        low_rank=low_rank is not None,
        **_head_spec(weight, transform),
    )
    if rows is None:
        rows = rows_for(spec, cd, distill_loss)
    bias = maskvec = None
    if transform is not None:
        bias = transform.bias
        if transform.masked_ids:
            maskvec = transform.mask_vector(V, cd)
    if quantized:
        W = [weight.weight, weight.scales] + ([] if weight.biases is None else [weight.biases])
    else:
        W = weight
    lr = None
    if low_rank is not None:
        lr = [low_rank.u.reshape(N, low_rank.u.shape[-1]), low_rank.b]
    loss, ce, kd, cov = fused_loss(spec, rows, h2, W, extras, bias, maskvec, lr)
    metrics = {"ce": ce, "kd": kd, "covered_mass": cov}
    return loss, {k: mx.stop_gradient(v) for k, v in metrics.items()}


def _check_low_rank(low_rank, hidden, weight) -> None:
    if low_rank is None:
        return
    if not isinstance(low_rank, LowRank):
        _fail(f"low_rank must be a LowRank or None, got {type(low_rank).__name__}")
    u, b = low_rank
    lead = tuple(hidden.shape[:-1])
    if u.ndim != len(lead) + 1 or tuple(u.shape[:-1]) != lead:
        _fail(f"low_rank u must be {lead + ('r',)}, got {u.shape}")
    if b.ndim != 2 or tuple(b.shape) != (weight.shape[0], u.shape[-1]):
        _fail(f"low_rank b must be ({weight.shape[0]}, {u.shape[-1]}), got {b.shape}")
    if not (mx.issubdtype(u.dtype, mx.floating) and mx.issubdtype(b.dtype, mx.floating)):
        _fail("low_rank u and b must be floating point")


def _head_spec(weight, transform: LogitTransform | None) -> dict:
    """The `Spec` fields that describe the head (none for a plain dense head)."""
    out = {}
    if isinstance(weight, QuantizedWeight):
        out["quant"] = (weight.group_size, weight.bits, weight.mode)
    if transform is not None:
        out.update(
            scale=transform.scale,
            softcap=None if transform.softcap is None else float(transform.softcap),
            has_bias=transform.bias is not None,
            masked=bool(transform.masked_ids),
        )
    return out
