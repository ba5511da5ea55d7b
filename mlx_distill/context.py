"""What every stage function gets: the recipe, the run directory and how to report progress.

A leaf module (imports only the recipe) so that the stage runner, the stage functions, evaluation
and the report can all use it without importing each other.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlx_distill.recipe import Recipe


@dataclass
class Context:
    """What every stage function gets."""

    recipe: Recipe
    run_dir: Path
    progress: bool = True
    retry_failed: bool = False
    jobs: int = 2  # >= 2: the baseline trains in a second process while the KD student trains
    bar_position: int = 0  # terminal line of this process's progress bars
    recipe_path: str = "RECIPE"  # as the user gave it, with `overrides`: for commands in messages
    overrides: tuple[str, ...] = ()
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name


def read_stage(ctx: Context, name: str) -> dict | None:
    """The stage's `stage.json` (fingerprint, status, timings, result), or None if absent/torn."""
    path = ctx.stage_dir(name) / "stage.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
