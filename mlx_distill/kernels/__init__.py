"""Fused linear + distillation loss: `distill_loss(hidden, weight, targets, ...)`.

See `loss.distill_loss` for the contract, `portable.py` for the math, `NOTES.md` for backends.
"""

from mlx_distill.kernels.loss import distill_loss, forward_only
from mlx_distill.kernels.selfcheck import kernel_status
from mlx_distill.kernels.targets import (
    DenseTargets,
    LogitTransform,
    LowRank,
    QuantizedWeight,
    SparseTargets,
)

__all__ = [
    "DenseTargets",
    "LogitTransform",
    "LowRank",
    "QuantizedWeight",
    "SparseTargets",
    "distill_loss",
    "forward_only",
    "kernel_status",
]
