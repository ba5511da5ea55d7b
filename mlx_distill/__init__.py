"""mlx-distill: knowledge distillation on Apple silicon with MLX."""

__version__ = "0.1.0"
