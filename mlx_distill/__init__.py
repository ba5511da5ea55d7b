"""mlx-distill: knowledge distillation on Apple silicon with MLX.

The layers, each calling only the ones below it: the CLI (`cli.py`) calls the runner (`run/`),
the runner calls the stage bodies (`stages/`), the stages call the libraries (`text/`, `tasks/`,
`teachers/`, `cache/`, `models/`, `kernels/`, `train/`, `evaluate.py`, `report.py`, `chat.py`,
`plan.py`), over the typed recipe (`recipe.py`, `schema.py`) and `backend.py`, `files.py`,
`errors.py`.

Importing the package does nothing else: on Linux CPU, call `backend.setup()` before anything
imports mlx.core to get the fast BLAS (the CLI does).
"""

__version__ = "0.1.0"
