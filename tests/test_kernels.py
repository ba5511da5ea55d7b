"""distill_loss (portable path) against the float64 NumPy reference in kd_reference.py.

Tolerances: fp32 inputs, values within 2e-5 relative + 2e-5 absolute; gradients within 1e-4 of
the largest gradient entry (fp32 logits vs float64 finite differences, error ~1e-6 observed).
Every test draws fresh random inputs; the seed is in the failure message.
"""

from __future__ import annotations

import itertools
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kd_reference import reference

from mlx_distill.errors import BadInput
from mlx_distill.kernels import DenseTargets, SparseTargets, distill_loss, forward_only

VAL_TOL = 2e-5
GRAD_TOL = 1e-4


def _problem(N=7, V=41, d=16, k=5, seed=None):
    """Random student, sparse top-k teacher (with a duplicate id and an empty slot), labels."""
    seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else seed
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, d)).astype(np.float32)
    W = (rng.normal(size=(V, d)) * 0.6).astype(np.float32)
    t = (rng.normal(size=(N, V)) * 2.0).astype(np.float32)
    order = np.argsort(-t, axis=1)
    ids = order[:, :k].astype(np.int32)
    logp = t - np.log(np.exp(t.astype(np.float64)).sum(1, keepdims=True))
    lp = np.take_along_axis(logp, ids, 1).astype(np.float32)
    if k > 2 and N > 1:
        ids[0, 2] = ids[0, 1]  # duplicate: acts as one id with the summed probability
        lp[1, k - 1] = -np.inf  # empty slot
    labels = rng.integers(0, V, N).astype(np.int32)
    mask = rng.random(N) > 0.3
    mask[0] = True
    return dict(seed=seed, h=h, W=W, t=t, ids=ids, lp=lp, labels=labels, mask=mask)


def _run(
    p,
    ttype,
    *,
    kind="forward_kl",
    T=1.0,
    tail="bucket",
    use_labels=False,
    use_mask=False,
    kd_weight=0.3,
    beta=0.5,
    chunk_size=3,
    dtype=mx.float32,
):
    """MLX loss, metrics and grads, and the float64 reference, for problem p."""
    if ttype == "sparse":
        tg = SparseTargets(mx.array(p["ids"]), mx.array(p["lp"]))
        rt = ("sparse", p["ids"], p["lp"])
    elif ttype == "dense":
        tg = DenseTargets(mx.array(p["t"]))
        rt = ("dense", p["t"].astype(np.float64))
    else:
        tg, rt = None, None
    kw = dict(
        kind=kind,
        temperature=T,
        tail=tail,
        beta=beta,
        kd_weight=kd_weight,
        labels=mx.array(p["labels"]) if use_labels else None,
        mask=mx.array(p["mask"]) if use_mask else None,
    )

    def f(h, W):
        return distill_loss(h, W, tg, chunk_size=chunk_size, **kw)

    h, W = mx.array(p["h"]).astype(dtype), mx.array(p["W"]).astype(dtype)
    (loss, metrics), (dh, dW) = mx.value_and_grad(f, argnums=(0, 1))(h, W)
    ref = reference(
        p["h"],
        p["W"],
        rt,
        kind=kind,
        beta=beta,
        T=T,
        tail=tail,
        labels=p["labels"] if use_labels else None,
        kd_weight=kd_weight if use_labels else 1.0,
        mask=p["mask"] if use_mask else None,
    )
    return (loss, metrics, dh, dW), ref


def _close(got, ref, msg, dtype_scale=1.0):
    loss, metrics, dh, dW = got
    rl, rm, rdh, rdW = ref
    vt = VAL_TOL * dtype_scale
    assert abs(loss.item() - rl) <= vt * (1 + abs(rl)), f"loss {loss.item()} vs {rl} {msg}"
    for key, want in rm.items():
        assert abs(metrics[key].item() - want) <= vt * (1 + abs(want)), f"{key} {msg}"
    scale = max(np.abs(rdh).max(), np.abs(rdW).max(), 1e-3)
    gt = GRAD_TOL * dtype_scale * scale
    err_h = np.abs(np.array(dh.astype(mx.float32)) - rdh).max()
    err_W = np.abs(np.array(dW.astype(mx.float32)) - rdW).max()
    assert err_h <= gt and err_W <= gt, (
        f"grad err {err_h:.2e} {err_W:.2e} (scale {scale:.2e}) {msg}"
    )


SPARSE_CASES = [
    ("forward_kl", "bucket"),
    ("forward_kl", "ignore"),
    ("reverse_kl", "bucket"),
    ("jsd", "bucket"),
    ("tvd", "bucket"),
]
MATRIX = [
    (ttype, kind, tail, T, labels, masked)
    for ttype in ("sparse", "dense")
    for kind, tail in (
        SPARSE_CASES
        if ttype == "sparse"
        else [(k, "bucket") for k in ("forward_kl", "reverse_kl", "jsd", "tvd")]
    )
    for T, labels, masked in itertools.product((1.0, 2.0), (False, True), (False, True))
]


@pytest.mark.parametrize("ttype,kind,tail,T,labels,masked", MATRIX)
def test_matrix_against_reference(ttype, kind, tail, T, labels, masked):
    p = _problem()
    got, ref = _run(p, ttype, kind=kind, T=T, tail=tail, use_labels=labels, use_mask=masked)
    _close(got, ref, f"seed={p['seed']}")


@pytest.mark.parametrize("masked", [False, True])
def test_plain_cross_entropy(masked):
    p = _problem()
    got, ref = _run(p, None, kind="ce", use_labels=True, use_mask=masked)
    _close(got, ref, f"seed={p['seed']}")
    assert got[1]["kd"].item() == 0.0 and got[1]["covered_mass"].item() == 0.0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_k1_n1_and_odd_vocab(kind):
    # k = 1, a single token, a vocabulary that is no multiple of any block size
    p = _problem(N=1, V=1031, d=24, k=1)
    got, ref = _run(p, "sparse", kind=kind, T=2.0, use_labels=True, beta=0.3)
    _close(got, ref, f"seed={p['seed']}")


def test_neg_inf_logprobs():
    p = _problem(N=5, V=29, k=4)
    p["lp"][2, :] = -np.inf  # a row with no targets at all: the whole teacher mass is in the tail
    p["lp"][3, 1:] = -np.inf
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        got, ref = _run(p, "sparse", kind=kind, use_labels=True)
        assert np.isfinite(got[0].item())
        _close(got, ref, f"{kind} seed={p['seed']}")
    # dense teacher with -inf logits (0 probability)
    p["t"][0, :5] = -np.inf
    got, ref = _run(p, "dense", kind="forward_kl", T=2.0)
    _close(got, ref, f"dense seed={p['seed']}")


def test_duplicate_ids_equal_merged_entry():
    p = _problem(N=3, V=23, k=3)
    ids = np.array([[4, 4, 9]] * 3, np.int32)
    lp = np.log(np.array([[0.2, 0.3, 0.1]] * 3, np.float32))
    merged_ids = np.array([[4, 9, 0]] * 3, np.int32)
    merged_lp = np.log(np.array([[0.5, 0.1, 1.0]] * 3, np.float32))
    merged_lp[:, 2] = -np.inf  # empty slot
    h, W = mx.array(p["h"]), mx.array(p["W"])
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        a, _ = distill_loss(h, W, SparseTargets(mx.array(ids), mx.array(lp)), kind=kind)
        b, _ = distill_loss(
            h, W, SparseTargets(mx.array(merged_ids), mx.array(merged_lp)), kind=kind
        )
        assert abs(a.item() - b.item()) < 1e-6 * (1 + abs(b.item())), kind


def test_all_masked_gives_zero_and_zero_grads():
    p = _problem()
    p["mask"][:] = False
    p["ids"][:, 0] = -7  # garbage in masked rows is never read
    p["labels"][:] = 10**6
    for ttype, kind in (("sparse", "reverse_kl"), ("dense", "jsd"), (None, "ce")):
        (loss, metrics, dh, dW), _ = _run(p, ttype, kind=kind, use_labels=True, use_mask=True)
        assert loss.item() == 0.0
        assert all(v.item() == 0.0 for v in metrics.values())
        assert not np.any(np.array(dh)) and not np.any(np.array(dW))


def test_full_coverage_rounding_stays_finite():
    # every id is a target and the teacher mass rounds to >= 1: no tail class, finite loss
    p = _problem(N=4, V=6, k=6)
    p["ids"] = np.tile(np.arange(6, dtype=np.int32), (4, 1))
    p["lp"] = np.log(np.full((4, 6), 1 / 6 + 1e-6, np.float32))
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        got, ref = _run(p, "sparse", kind=kind)
        assert np.isfinite(got[0].item()) and np.isfinite(np.array(got[3])).all()
        _close(got, ref, kind)


def test_reverse_kl_with_topk_summing_to_one_is_finite():
    p = _problem(N=4, V=50, k=3)
    p["lp"] = np.log(np.tile(np.array([0.5, 0.3, 0.2], np.float32), (4, 1)))
    got, ref = _run(p, "sparse", kind="reverse_kl")
    assert np.isfinite(got[0].item())
    _close(got, ref, f"seed={p['seed']}")


def test_bf16_inputs():
    p = _problem(N=9, V=67, d=32, k=4)
    # round the inputs to bf16 first so that both sides see the same numbers
    for key in ("h", "W"):
        p[key] = np.array(mx.array(p[key]).astype(mx.bfloat16).astype(mx.float32))
    got, ref = _run(
        p, "sparse", kind="jsd", T=2.0, use_labels=True, use_mask=True, dtype=mx.bfloat16
    )
    assert got[2].dtype == mx.bfloat16 and got[3].dtype == mx.bfloat16
    assert got[0].dtype == mx.float32  # logits and loss are fp32 whatever the input dtype
    # only the gradients' final rounding to bf16 differs from fp32 (2^-8 relative)
    _close(got, ref, f"seed={p['seed']}", dtype_scale=40.0)


def test_vjp_finite_differences_float64():
    """Directional derivative of the MLX loss (float64 path) vs its own finite differences."""
    p = _problem(N=6, V=31, d=8, k=4)
    rng = np.random.default_rng(p["seed"] + 1)
    tg = SparseTargets(mx.array(p["ids"]), mx.array(p["lp"]))
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd"):

        def f(h, W, kind=kind):
            return distill_loss(
                h,
                W,
                tg,
                kind=kind,
                temperature=1.5,
                labels=mx.array(p["labels"]),
                kd_weight=0.7,
                mask=mx.array(p["mask"]),
                chunk_size=4,
            )[0]

        # mx.array() makes float32 from NumPy float64: cast explicitly
        h = mx.array(p["h"]).astype(mx.float64)
        W = mx.array(p["W"]).astype(mx.float64)
        vh = mx.array(rng.normal(size=p["h"].shape)).astype(mx.float64)
        vW = mx.array(rng.normal(size=p["W"].shape)).astype(mx.float64)
        dh, dW = mx.grad(f, argnums=(0, 1))(h, W)
        assert dh.dtype == mx.float64 and f(h, W).dtype == mx.float64
        analytic = (mx.sum(dh * vh) + mx.sum(dW * vW)).item()
        # MLX's float64 exp is only float32-accurate (~1e-7 relative), hence eps = 1e-3: the FD
        # error is ~1e-4 (rounding) + ~1e-6 (truncation); a wrong VJP term is far larger.
        eps = 1e-3
        numeric = (f(h + eps * vh, W + eps * vW) - f(h - eps * vh, W - eps * vW)).item() / (2 * eps)
        assert abs(analytic - numeric) <= 1e-3 * (1 + abs(numeric)), (kind, analytic, numeric)


def test_batched_shapes_chunking_and_forward_only():
    p = _problem(N=12, V=37, d=16, k=3)
    B, L = 3, 4
    h = mx.array(p["h"]).reshape(B, L, -1)
    W = mx.array(p["W"])
    tg = SparseTargets(mx.array(p["ids"]).reshape(B, L, -1), mx.array(p["lp"]).reshape(B, L, -1))
    labels = mx.array(p["labels"]).reshape(B, L)
    mask = mx.array(p["mask"]).reshape(B, L)

    def f(h, W, chunk_size):
        return distill_loss(
            h,
            W,
            tg,
            kind="jsd",
            labels=labels,
            mask=mask,
            kd_weight=0.5,
            temperature=2.0,
            chunk_size=chunk_size,
        )[0]

    results = [mx.value_and_grad(f, argnums=(0, 1))(h, W, c) for c in (None, 1, 5, 12)]
    with forward_only():
        results.append(mx.value_and_grad(f, argnums=(0, 1))(h, W, 5))
        plain = f(h, W, 5)
    assert results[0][1][0].shape == (B, L, h.shape[-1])
    for loss, (dh, dW) in results[1:]:
        assert abs(loss.item() - results[0][0].item()) < 1e-5
        assert mx.allclose(dh, results[0][1][0], atol=1e-6).item()
        assert mx.allclose(dW, results[0][1][1], atol=1e-6).item()
    assert abs(plain.item() - results[0][0].item()) < 1e-5


def test_inside_compile():
    p = _problem(N=10, V=53, d=16, k=4)
    tg = SparseTargets(mx.array(p["ids"]), mx.array(p["lp"]))
    labels, mask = mx.array(p["labels"]), mx.array(p["mask"])

    def f(h, W):
        return distill_loss(h, W, tg, labels=labels, mask=mask, kd_weight=0.4, chunk_size=4)[0]

    step = mx.value_and_grad(f, argnums=(0, 1))
    h, W = mx.array(p["h"]), mx.array(p["W"])
    eager = step(h, W)
    compiled = mx.compile(step)(h, W)
    assert abs(eager[0].item() - compiled[0].item()) < 1e-6
    assert mx.allclose(eager[1][0], compiled[1][0], atol=1e-6).item()
    assert mx.allclose(eager[1][1], compiled[1][1], atol=1e-6).item()


def test_tied_embedding_student_matches_autograd():
    """A tiny mlx-lm llama with a tied head: fused loss gradients == naive autograd gradients."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    model = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=32,
            num_hidden_layers=1,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=97,
            tie_word_embeddings=True,
        )
    )
    rng = np.random.default_rng()
    tokens = mx.array(rng.integers(0, 97, (2, 9)).astype(np.int32))
    labels = mx.array(rng.integers(0, 97, (2, 9)).astype(np.int32))
    mask = mx.array(rng.random((2, 9)) > 0.2)
    ids = mx.array(np.argsort(rng.random((2, 9, 97)), -1)[..., :4].astype(np.int32))
    lp = mx.log(mx.softmax(mx.array(rng.normal(size=(2, 9, 4)).astype(np.float32)), -1) * 0.8)

    def fused(model):
        h = model.model(tokens)
        W = model.model.embed_tokens.weight
        return distill_loss(
            h,
            W,
            SparseTargets(ids, lp),
            kind="reverse_kl",
            labels=labels,
            mask=mask,
            kd_weight=0.6,
            temperature=2.0,
            chunk_size=5,
        )[0]

    def naive(model):
        s = model(tokens) / 2.0
        logq = s - mx.logsumexp(s, axis=-1, keepdims=True)
        logqK = mx.take_along_axis(logq, ids, axis=-1)
        qK = mx.exp(logqK)
        pK = mx.exp(lp)
        q_t, p_t = 1 - qK.sum(-1), 1 - pK.sum(-1)
        kd = 4.0 * ((qK * (logqK - lp)).sum(-1) + q_t * (mx.log(q_t) - mx.log(p_t)))
        z = model(tokens)
        ce = mx.logsumexp(z, -1) - mx.take_along_axis(z, labels[..., None], -1)[..., 0]
        m = mask.astype(mx.float32)
        return ((0.4 * ce + 0.6 * kd) * m).sum() / m.sum()

    lf, gf = nn.value_and_grad(model, fused)(model)
    ln, gn = nn.value_and_grad(model, naive)(model)
    assert abs(lf.item() - ln.item()) < 1e-4 * (1 + abs(ln.item()))
    for (name, a), (_, b) in zip(tree_flatten(gf), tree_flatten(gn)):
        assert mx.allclose(a, b, atol=2e-5, rtol=1e-3).item(), name


def _peak_extra(N, V=8192, d=64, chunk=64):
    h = mx.random.normal((N, d))
    W = mx.random.normal((V, d)) * 0.1
    labels = mx.random.randint(0, V, (N,)).astype(mx.int32)
    ids = mx.random.randint(0, V, (N, 8)).astype(mx.int32)
    lp = mx.full((N, 8), -3.0)
    mx.eval(h, W, labels, ids, lp)
    step = mx.value_and_grad(
        lambda h, W: distill_loss(
            h, W, SparseTargets(ids, lp), labels=labels, kd_weight=0.5, chunk_size=chunk
        )[0],
        argnums=(0, 1),
    )
    mx.eval(step(h, W))
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(step(h, W))
    return mx.get_peak_memory() - base


def test_peak_memory_is_per_chunk():
    """Doubling the tokens adds only O(N d) (dh), never another (N, V) of logits."""
    V, d = 8192, 64
    small, large = _peak_extra(1024, V, d), _peak_extra(2048, V, d)
    assert large - small < 1024 * d * 4 * 4, (small, large)
    assert large < 0.25 * 2048 * V * 4, large  # naive holds several (N, V) fp32 arrays


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(kind="kl"), "kind"),
        (dict(tail="drop"), "tail"),
        (dict(temperature=0.0), "temperature"),
        (dict(kind="jsd", beta=1.0), "beta"),
        (dict(kd_weight=1.5), "kd_weight"),
        (dict(kind="reverse_kl", tail="ignore"), "ignore"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(labels=mx.zeros((3,), mx.int32)), "labels"),
        (dict(mask=mx.ones((7, 1), mx.bool_)), "mask"),
        (dict(kind="ce"), "ce"),
    ],
)
def test_bad_input(bad, match):
    p = _problem()
    tg = SparseTargets(mx.array(p["ids"]), mx.array(p["lp"]))
    with pytest.raises(BadInput, match=match):
        distill_loss(mx.array(p["h"]), mx.array(p["W"]), tg, **bad)


def test_bad_shapes():
    p = _problem()
    h, W = mx.array(p["h"]), mx.array(p["W"])
    with pytest.raises(BadInput, match="weight"):
        distill_loss(h, W.T, None, kind="ce", labels=mx.array(p["labels"]))
    with pytest.raises(BadInput, match="sparse"):
        distill_loss(h, W, SparseTargets(mx.array(p["ids"][:3]), mx.array(p["lp"][:3])))
    with pytest.raises(BadInput, match="dense"):
        distill_loss(h, W, DenseTargets(mx.array(p["t"][:, :5])))
    with pytest.raises(BadInput, match="needs targets"):
        distill_loss(h, W, None)
    with pytest.raises(BadInput, match="empty"):
        distill_loss(h[:0], W, None, kind="ce", labels=mx.array(p["labels"])[:0])


def test_bench_loss_compares_like_with_like(monkeypatch):
    from mlx_distill.kernels import bench

    args = bench._inputs(48, 300, 16)
    assert abs(bench.naive_loss(*args).item() - bench.fused_loss(*args).item()) < 1e-4
    out = bench.bench_loss((48, 300, 16), repeats=1)
    assert set(out) == {"size", "backend", "naive", "fused", "memory_ratio", "time_ratio"}
    assert out["size"] == [48, 300, 16] and out["backend"].startswith("cpu/")
    for key in ("naive", "fused"):
        assert out[key]["seconds"] > 0 and out[key]["peak_bytes"] > 0
    assert out["memory_ratio"] == pytest.approx(
        out["fused"]["peak_bytes"] / out["naive"]["peak_bytes"]
    )
    json.dumps(out)
    monkeypatch.setattr(bench, "NAIVE_LIMIT_BYTES", 0)
    out = bench.bench_loss((48, 300, 16), repeats=1)
    assert out["naive"]["seconds"] is None and out["time_ratio"] is None
    assert "skipped" in out["naive"] and out["naive"]["estimated_peak_bytes"] > 0
    assert out["memory_ratio"] == pytest.approx(
        out["fused"]["peak_bytes"] / out["naive"]["estimated_peak_bytes"]
    )
