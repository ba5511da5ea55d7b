"""What a running stage is handed: the recipe, the run directory, the stage's own fingerprint
and how to report progress.

A leaf module (imports only the recipe): the runner (`run/`) makes one per stage and the stage
bodies (`stages/`) read it. Libraries never see it.
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
    """What every stage body gets."""

    recipe: Recipe
    run_dir: Path
    progress: bool = True
    retry_failed: bool = False
    jobs: int = 2  # >= 2: the baseline trains in a second process while the KD student trains
    bar_position: int = 0  # terminal line of this process's progress bars
    recipe_path: str = "RECIPE"  # as the user gave it, with `overrides`: for commands in messages
    overrides: tuple[str, ...] = ()
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))
    fingerprint: str = ""  # the running stage's, set by the runner (what its checkpoints match)

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


def stage_result(ctx: Context, name: str) -> dict:
    """The summary the stage's last run returned ({} if it has none)."""
    return (read_stage(ctx, name) or {}).get("result") or {}
