"""Native (Metal / CUDA) row pass: self-check logic everywhere, the kernels where a GPU exists."""

from __future__ import annotations

import re
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_distill.errors import BadInput
from mlx_distill.kernels import SparseTargets, distill_loss, kernel_status, native, selfcheck
from mlx_distill.kernels.rows import PortableRows

HAS_METAL = mx.metal.is_available()
HAS_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()


class ShiftedRows(PortableRows):
    """A row pass with a small bug: the row sums are 0.1% too large."""

    name = "shifted"

    def stats(self, s, temperature):
        st = super().stats(s, temperature)
        return st._replace(S=st.S * 1.001)


class CopyRows(PortableRows):
    name = "copy"


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.delenv(selfcheck.ENV, raising=False)
    selfcheck.reset()
    yield
    selfcheck.reset()


def _fake_native(monkeypatch, rows_factory):
    """Pretend a GPU backend exists whose kernel is `rows_factory()`."""
    monkeypatch.setattr(native, "native_backend", lambda: "fake")
    monkeypatch.setattr(selfcheck, "_make_native", rows_factory)


def _loss(seed=0):
    rng = np.random.default_rng(seed)
    h = mx.array(rng.normal(size=(9, 16)).astype(np.float32))
    W = mx.array(rng.normal(size=(53, 16)).astype(np.float32))
    ids = mx.array(rng.integers(0, 53, (9, 3)).astype(np.int32))
    lp = mx.log(mx.softmax(mx.array(rng.normal(size=(9, 3)).astype(np.float32)), -1) * 0.7)
    return distill_loss(h, W, SparseTargets(ids, lp))[0]


def test_selfcheck_enables_an_agreeing_kernel(monkeypatch):
    _fake_native(monkeypatch, CopyRows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = _loss()
    status = kernel_status()
    assert status["state"] == "enabled" and status["native"] == "fake"
    assert status["backend"].endswith("/copy")
    selfcheck.reset()
    monkeypatch.setenv(selfcheck.ENV, "portable")
    assert abs(_loss().item() - first.item()) < 1e-6


def test_selfcheck_disables_a_wrong_kernel_with_one_warning(monkeypatch):
    _fake_native(monkeypatch, ShiftedRows)
    with pytest.warns(RuntimeWarning, match="native loss kernel disabled") as record:
        _loss()
        _loss(seed=1)
    assert len(record) == 1
    status = kernel_status()
    assert status["state"] == "disabled" and "relative error" in status["reason"]
    assert status["backend"].endswith("/portable")


def test_selfcheck_disables_a_kernel_that_fails_to_build(monkeypatch):
    def broken():
        raise RuntimeError("[metal_kernel] compile error")

    _fake_native(monkeypatch, broken)
    with pytest.warns(RuntimeWarning, match="compile error"):
        loss = _loss()
    assert np.isfinite(loss.item())
    assert kernel_status()["state"] == "disabled"


def test_selfcheck_catches_small_errors():
    ok, detail = selfcheck.compare(ShiftedRows(), distill_loss)
    assert not ok, detail
    ok, detail = selfcheck.compare(CopyRows(), distill_loss)
    assert ok, detail


def test_env_forces_a_path(monkeypatch):
    _fake_native(monkeypatch, ShiftedRows)
    monkeypatch.setenv(selfcheck.ENV, "portable")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loss()
    assert kernel_status()["state"] == "forced-portable"
    selfcheck.reset()
    monkeypatch.setenv(selfcheck.ENV, "native")  # forced: no self-check, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loss()
    assert kernel_status()["state"] == "forced"
    monkeypatch.setenv(selfcheck.ENV, "fast")
    with pytest.raises(BadInput, match=selfcheck.ENV):
        _loss()


@pytest.mark.skipif(HAS_METAL or HAS_CUDA, reason="checks the no-GPU behaviour")
def test_without_gpu(monkeypatch):
    assert kernel_status()["state"] == "unavailable"
    monkeypatch.setenv(selfcheck.ENV, "native")
    with pytest.raises(BadInput, match="no Metal or CUDA"):
        _loss()


def test_one_body_for_both_backends():
    """Every macro the kernel bodies use is defined by both backend preludes."""

    def defined(prelude):
        return set(re.findall(r"#define (\w+)", prelude))

    used = set(
        re.findall(
            r"\b(ROW|TID|NT|GX|SHARED|SYNC|EXPF|NEG_INF)\b", native.STATS_BODY + native.GRAD_BODY
        )
    )
    assert used <= defined(native._METAL_PRELUDE)
    assert used <= defined(native._CUDA_PRELUDE)
    assert defined(native._METAL_PRELUDE) == defined(native._CUDA_PRELUDE)


def _native_matches_portable(backend):
    rows = native.NativeRows(backend)
    ok, detail = selfcheck.compare(rows, distill_loss)
    assert ok, detail
    # and on a bigger vocabulary than one threadgroup covers, with an all-masked row
    s = mx.random.normal((5, 70001)) * 4
    s = mx.concatenate([s, mx.full((1, 70001), float("-inf"))])
    for T in (None, 2.0):
        a, b = PortableRows().stats(s, T), rows.stats(s, T)
        assert mx.allclose(a.m, b.m).item() and mx.allclose(a.S, b.S, rtol=1e-4).item()
        if T is not None:
            assert mx.allclose(a.Sz, b.Sz, rtol=1e-4).item()
        coef = mx.random.uniform(shape=(6,))
        ga = PortableRows().grad(s, a, coef, coef if T else None)
        gb = rows.grad(s, b, coef, coef if T else None)
        assert mx.allclose(ga, gb, rtol=1e-4, atol=1e-7).item()


@pytest.mark.metal
@pytest.mark.skipif(not HAS_METAL, reason="needs an Apple-silicon GPU (Metal)")
def test_metal_kernel_matches_portable():
    _native_matches_portable("metal")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU with mlx[cuda]")
def test_cuda_kernel_matches_portable():
    _native_matches_portable("cuda")
