"""Synthetic tasks with checkable answers: a generator plus an answer checker per task."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from mlx_distill.errors import BadInput

TASKS = ("arithmetic",)


def get_checker(name: str | None) -> Callable[[str, str], bool] | None:
    """The answer checker of task `name` (None: no exact-match evaluation)."""
    if name is None:
        return None
    if name not in TASKS:
        raise BadInput(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return importlib.import_module(f"mlx_distill.tasks.{name}").check
