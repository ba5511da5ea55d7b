"""`distill_loss` with a logits transform (scale, softcap, bias, masked ids) and with quantized
heads, against the float64 reference on fresh random inputs (sizes not multiples of the chunk)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from kd_reference import reference

from mlx_distill.errors import BadInput
from mlx_distill.kernels import DenseTargets, SparseTargets, distill_loss
from mlx_distill.kernels.targets import LogitTransform, QuantizedWeight

TRANSFORMS = {
    # wide logits (|z| up to ~20) so that a softcap of 5 bends them hard
    "softcap": dict(scale=3.0, softcap=5.0),
    "scale": dict(scale=0.37),
    "bias": dict(bias=True),
    "masked": dict(scale=2.0, masked=(3, 17, 40)),
    "all": dict(scale=1.7, softcap=8.0, bias=True, masked=(0, 5)),
}


def _problem(N=11, V=43, d=16, k=5):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, d))
    W = rng.normal(size=(V, d)) * 0.8
    t = rng.normal(size=(N, V)) * 2.0
    ids = np.argsort(-t, axis=1)[:, :k].astype(np.int32)
    logp = t - np.log(np.exp(t).sum(1, keepdims=True))
    lp = np.take_along_axis(logp, ids, 1)
    labels = rng.integers(0, V, N).astype(np.int32)
    mask = rng.random(N) > 0.3
    mask[0] = True
    bias = rng.normal(size=V) * 3.0
    return dict(seed=seed, h=h, W=W, t=t, ids=ids, lp=lp, labels=labels, mask=mask, bias=bias)


def _transform(p, name):
    cfg = dict(TRANSFORMS[name])
    masked = cfg.get("masked", ())
    if masked:
        # a teacher of the same architecture never puts mass on a masked id
        p["t"][:, list(masked)] = -np.inf
        p["lp"] = np.where(np.isin(p["ids"], masked), -np.inf, p["lp"])
        p["labels"] = np.where(np.isin(p["labels"], masked), 1, p["labels"])
    bias = p["bias"] if cfg.get("bias") else None
    ref = {"scale": cfg.get("scale", 1.0), "softcap": cfg.get("softcap"), "bias": bias}
    ref["masked"] = masked
    return cfg, ref, bias


CASES = [
    ("sparse", "forward_kl", 2.0, True),
    ("sparse", "reverse_kl", 1.0, False),
    ("sparse", "jsd", 1.0, True),
    ("dense", "forward_kl", 1.0, True),
    ("dense", "reverse_kl", 2.0, False),
    ("dense", "jsd", 1.0, False),
    ("none", "ce", 1.0, True),
]


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("ttype,kind,T,labels", CASES)
def test_transform_against_float64_reference(name, ttype, kind, T, labels):
    p = _problem()
    cfg, ref_tf, bias = _transform(p, name)
    if ttype == "sparse":
        tg, rt = SparseTargets(mx.array(p["ids"]), mx.array(p["lp"])), ("sparse", p["ids"], p["lp"])
    elif ttype == "dense":
        tg, rt = DenseTargets(mx.array(p["t"])), ("dense", p["t"])
    else:
        tg, rt = None, None
    y = mx.array(p["labels"]) if labels else None
    kw = dict(kind=kind, temperature=T, labels=y, kd_weight=0.4, mask=mx.array(p["mask"]))

    def f(h, W, b):
        tf = LogitTransform(
            logit_scale=cfg.get("scale", 1.0),
            softcap=cfg.get("softcap"),
            bias=b if bias is not None else None,
            masked_ids=tuple(cfg.get("masked", ())),
        )
        return distill_loss(h, W, tg, chunk_size=4, transform=tf, **kw)[0]

    h, W = mx.array(p["h"], dtype=mx.float64), mx.array(p["W"], dtype=mx.float64)
    b = mx.array(p["bias"], dtype=mx.float64)
    with mx.stream(mx.cpu):
        loss, (dh, dW, db) = mx.value_and_grad(f, argnums=(0, 1, 2))(h, W, b)
        mx.eval(loss, dh, dW, db)
    rl, _, rdh, rdW, rdb = reference(
        p["h"],
        p["W"],
        rt,
        kind=kind,
        T=T,
        labels=p["labels"] if labels else None,
        kd_weight=0.4 if labels else 1.0,
        mask=p["mask"],
        transform=ref_tf,
    )
    msg = f"seed {p['seed']}"
    assert np.isfinite(rl), msg
    assert abs(loss.item() - rl) <= 1e-6 * (1 + abs(rl)), f"loss {loss.item()} vs {rl} {msg}"
    scale = max(np.abs(rdh).max(), np.abs(rdW).max(), 1e-3)
    for got, want, what in ((dh, rdh, "dh"), (dW, rdW, "dW")):
        err = np.abs(np.array(got) - want).max()
        assert err <= 1e-5 * scale, f"{what} err {err:.2e} (scale {scale:.2e}) {msg}"
    if bias is not None:
        err = np.abs(np.array(db) - rdb).max()
        assert err <= 1e-5 * max(np.abs(rdb).max(), 1e-3), f"dbias err {err:.2e} {msg}"
    else:
        assert not np.any(np.array(db)), "a transform without bias gives the bias no gradient"


def test_fp32_transform_inside_compile_matches_float64():
    p = _problem(N=37, V=301, d=24)
    tf = LogitTransform(logit_scale=2.5, softcap=6.0, bias=mx.array(p["bias"], dtype=mx.float32))
    tg = SparseTargets(mx.array(p["ids"]), mx.array(p["lp"], dtype=mx.float32))
    y = mx.array(p["labels"])

    def f(h, W, dtype):
        t = LogitTransform(logit_scale=2.5, softcap=6.0, bias=tf.bias.astype(dtype))
        return distill_loss(h, W, tg, labels=y, kd_weight=0.5, chunk_size=16, transform=t)[0]

    with mx.stream(mx.cpu):
        ref_l, (ref_dh, ref_dW) = mx.value_and_grad(
            lambda h, W: f(h, W, mx.float64), argnums=(0, 1)
        )(mx.array(p["h"], dtype=mx.float64), mx.array(p["W"], dtype=mx.float64))
        step = mx.compile(mx.value_and_grad(lambda h, W: f(h, W, mx.float32), argnums=(0, 1)))
        loss, (dh, dW) = step(mx.array(p["h"], dtype=mx.float32), mx.array(p["W"], mx.float32))
        mx.eval(ref_l, ref_dh, ref_dW, loss, dh, dW)
    assert abs(loss.item() - ref_l.item()) <= 1e-5 * abs(ref_l.item())
    for got, want in ((dh, ref_dh), (dW, ref_dW)):
        rel = np.linalg.norm(np.array(got) - np.array(want)) / np.linalg.norm(np.array(want))
        assert rel <= 1e-5, rel


QUANT = [("affine", 32, 4), ("affine", 32, 8), ("mxfp4", 32, 4)]


@pytest.mark.parametrize("mode,group,bits", QUANT)
def test_quantized_head_matches_dequantized_reference(mode, group, bits):
    p = _problem(N=23, V=67, d=64)
    out = mx.quantize(mx.array(p["W"], dtype=mx.float32), group, bits, mode=mode)
    qw = QuantizedWeight(out[0], out[1], out[2] if len(out) > 2 else None, group, bits, mode)
    W_deq = np.array(qw.dequantize(), dtype=np.float64)
    tg = SparseTargets(mx.array(p["ids"]), mx.array(p["lp"], dtype=mx.float32))
    tf = LogitTransform(logit_scale=2.0, softcap=4.0)

    def f(h):
        return distill_loss(
            h, qw, tg, labels=mx.array(p["labels"]), kd_weight=0.3, chunk_size=5, transform=tf
        )[0]

    loss, dh = mx.value_and_grad(f)(mx.array(p["h"], dtype=mx.float32))
    rl, _, rdh, _, _ = reference(
        p["h"],
        W_deq,
        ("sparse", p["ids"], p["lp"]),
        labels=p["labels"],
        kd_weight=0.3,
        transform={"scale": 2.0, "softcap": 4.0},
    )
    assert abs(loss.item() - rl) <= 1e-5 * (1 + abs(rl)), f"seed {p['seed']}"
    assert np.abs(np.array(dh) - rdh).max() <= 1e-4 * np.abs(rdh).max(), f"seed {p['seed']}"


def test_transform_bad_input():
    h, W = mx.zeros((4, 8)), mx.zeros((10, 8))
    with pytest.raises(BadInput, match="bias must be"):
        distill_loss(
            h,
            W,
            None,
            kind="ce",
            labels=mx.zeros(4, mx.int32),
            transform=LogitTransform(bias=mx.zeros(9)),
        )
    with pytest.raises(BadInput, match="masked_ids"):
        distill_loss(
            h,
            W,
            None,
            kind="ce",
            labels=mx.zeros(4, mx.int32),
            transform=LogitTransform(masked_ids=(10,)),
        )
    with pytest.raises(BadInput, match="softcap"):
        distill_loss(
            h,
            W,
            None,
            kind="ce",
            labels=mx.zeros(4, mx.int32),
            transform=LogitTransform(softcap=0.0),
        )
