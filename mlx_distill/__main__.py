from mlx_distill.cli import main

main()
