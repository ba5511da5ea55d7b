"""Which per-row pass `distill_loss` uses. This commit has the portable path only."""

import mlx.core as mx

from mlx_distill.kernels.rows import PortableRows

_PORTABLE = PortableRows()


def rows_for(spec):
    """The row pass for one call (`spec`: portable.Spec)."""
    return _PORTABLE


def backend_label() -> str:
    """'<device>/<row pass>', e.g. 'cpu/portable'."""
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return f"{device}/{_PORTABLE.name}"


def kernel_status() -> dict:
    """Which loss path runs here and why."""
    return {"backend": backend_label(), "native": "not built in this version"}
