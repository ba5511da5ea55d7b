"""mlx-distill: knowledge distillation on Apple silicon with MLX."""

__version__ = "0.1.0"

# Before anything imports mlx.core: on Linux CPU, load an optimized BLAS (see backend.py).
from mlx_distill import backend as _backend  # noqa: E402

_backend.setup()
