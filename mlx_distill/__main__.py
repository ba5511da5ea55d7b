"""`python -m mlx_distill`: the `mlx-distill` command."""

from mlx_distill.cli import main

main()
