"""Shared fixtures. Importing mlx_distill first loads the fast BLAS before mlx.core."""

import mlx_distill  # noqa: F401  (must come before any mlx import)
