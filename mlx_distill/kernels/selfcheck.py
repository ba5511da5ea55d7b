"""Which row pass `distill_loss` uses: the native kernel only after it agreed with the portable
path on this machine.

At the first call that could use it, the native row pass (Metal or CUDA) computes loss and
gradients of a small random problem next to the portable path. On disagreement, or any error, it
is disabled for the process with one warning. `MLX_DISTILL_KERNEL=portable|native` forces a path
(native then skips the check).
"""

from __future__ import annotations

import os
import warnings

import mlx.core as mx
import numpy as np

from mlx_distill.errors import BadInput
from mlx_distill.kernels import native
from mlx_distill.kernels.rows import PortableRows
from mlx_distill.kernels.targets import SparseTargets

ENV = "MLX_DISTILL_KERNEL"
TOLERANCE = 1e-4  # relative: on the loss, and on each gradient in the Frobenius norm

_PORTABLE = PortableRows()


class TracingError(Exception):
    """The self-check was asked to evaluate while MLX is tracing (inside mx.compile)."""


_state: dict = {"state": "unchecked", "rows": None, "reason": ""}


def _forced() -> str | None:
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("portable", "native"):
        raise BadInput(f"{ENV} must be 'portable' or 'native', got {value!r}")
    return value


def _problem(seed: int = 0):
    """A small problem that exercises masking, duplicates, empty slots and CE at T != 1."""
    rng = np.random.default_rng(seed)
    N, V, d, k = 37, 1031, 48, 5
    h = mx.array(rng.normal(size=(N, d)).astype(np.float32))
    # small logits: q is spread over the whole vocabulary, so the dense part of the gradient (what
    # the kernel forms) dominates and any error in it shows
    W = mx.array((rng.normal(size=(V, d)) * 0.05).astype(np.float32))
    ids = rng.integers(0, V, size=(N, k)).astype(np.int32)
    ids[0, 1] = ids[0, 0]
    lp = np.log(rng.dirichlet(np.ones(k), size=N) * 0.8).astype(np.float32)
    lp[1, 2] = -np.inf
    labels = mx.array(rng.integers(0, V, size=N).astype(np.int32))
    mask = mx.array(rng.random(N) > 0.2)
    return h, W, mx.array(ids), mx.array(lp), labels, mask


def compare(candidate, loss, reference=_PORTABLE) -> tuple[bool, str]:
    """Loss and gradients with row pass `candidate` vs `reference` on `_problem()`.

    `loss` is `distill_loss` (passed in, so this module does not import the loss that uses it);
    each row pass goes to it as its `rows` argument. Returns (agree, detail). Runs outside any
    transformation (it evaluates).
    """
    h, W, ids, lp, labels, mask = _problem()
    errs = []
    # forward KL with CE at T = 2 (uses S and Sz), reverse KL at T = 1 (S only)
    for kind, T, y in (("forward_kl", 2.0, labels), ("reverse_kl", 1.0, None)):
        results = []
        for rows in (reference, candidate):

            def f(h, W, kind=kind, T=T, y=y, rows=rows):
                tg = SparseTargets(ids, lp)
                return loss(
                    h,
                    W,
                    tg,
                    kind=kind,
                    temperature=T,
                    labels=y,
                    kd_weight=0.5,
                    mask=mask,
                    chunk_size=16,
                    rows=rows,
                )[0]

            out = mx.value_and_grad(f, argnums=(0, 1))(h, W)
            mx.eval(out)
            results.append(out)
        (l0, (dh0, dW0)), (l1, (dh1, dW1)) = results
        errs.append(abs(l1.item() - l0.item()) / max(abs(l0.item()), 1e-6))
        for a, b in ((dh0, dh1), (dW0, dW1)):
            errs.append((mx.linalg.norm(b - a) / mx.maximum(mx.linalg.norm(a), 1e-12)).item())
    worst = max(errs)
    detail = f"max relative error {worst:.1e} (tolerance {TOLERANCE:.0e})"
    return bool(np.isfinite(worst) and worst <= TOLERANCE), detail


def check_native(make_rows, loss) -> None:
    """Build the native row pass with `make_rows()`, compare it under `loss`, enable or disable."""
    try:
        rows = make_rows()
        ok, detail = compare(rows, loss)
    except Exception as e:  # a kernel that fails to build or run is disabled, not fatal
        if "transformation" in str(e):
            raise TracingError(str(e)) from e
        rows, ok, detail = None, False, f"{type(e).__name__}: {e}"
    if ok:
        _state.update(state="enabled", rows=rows, reason=f"self-check passed ({detail})")
        return
    _state.update(state="disabled", rows=None, reason=f"self-check failed ({detail})")
    warnings.warn(
        f"mlx_distill: native loss kernel disabled, using the portable path: {detail}",
        RuntimeWarning,
        stacklevel=3,
    )


def _make_native():
    return native.NativeRows(native.native_backend())


def rows_for(spec, dtype, loss):
    """The row pass for one call (`spec`: portable.Spec; `dtype`: the logits' compute dtype).

    `loss`: `distill_loss`, run by the self-check on its first use.
    """
    if spec.targets == "dense" or dtype != mx.float32:
        return _PORTABLE  # the kernels cover sparse targets and CE on fp32 logits
    forced = _forced()
    if forced == "portable":
        return _PORTABLE

    if native.native_backend() is None:
        if forced == "native":
            raise BadInput(f"{ENV}=native, but MLX has no Metal or CUDA backend here")
        return _PORTABLE
    if forced == "native":
        if _state["rows"] is None:
            _state.update(state="forced", rows=_make_native(), reason=f"{ENV}=native")
        return _state["rows"]
    if _state["state"] == "unchecked":
        try:
            check_native(_make_native, loss)
        except TracingError:
            # First use inside mx.compile (evaluating is not allowed there): stay portable for
            # this trace and check at the next call made outside a transformation.
            return _PORTABLE
    return _state["rows"] if _state["state"] == "enabled" else _PORTABLE


def backend_label() -> str:
    """'<device>/<row pass>', e.g. 'cpu/portable' or 'gpu/metal'."""
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    rows = _state["rows"] if _state["state"] in ("enabled", "forced") else _PORTABLE
    return f"{device}/{rows.name}"


def kernel_status() -> dict:
    """Which row pass runs here and why: {"native", "state", "reason", "backend"}."""
    found = native.native_backend()
    state, reason = _state["state"], _state["reason"]
    try:
        forced = _forced()
    except BadInput as e:
        forced, state, reason = None, "error", str(e)
    if found is None:
        state, reason = "unavailable", "no Metal or CUDA backend in this MLX build"
    elif forced == "portable":
        state, reason = "forced-portable", f"{ENV}=portable"
    return {"native": found, "state": state, "reason": reason, "backend": backend_label()}


def reset() -> None:
    """Forget the self-check result (tests)."""
    _state.clear()
    _state.update(state="unchecked", rows=None, reason="")
