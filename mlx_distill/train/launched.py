"""A rank that `mlx-distill run --hosts` started (`run/launch.py`): its exit code, reported.

`mlx.launch` does not report the ranks' outcome honestly (in mlx 0.32.4 it exits 0 when a rank
fails), so every rank it starts for us has MLX_DISTILL_LAUNCHED set and prints its own exit code
as its last stderr line, `[mlx-distill] rank R exit C`; the launching command reads those lines
(`EXIT_LINE`). A leaf module (no mlx import): the CLI uses it before anything heavy is loaded.
"""

from __future__ import annotations

import os
import re
import sys

LAUNCHED_ENV = "MLX_DISTILL_LAUNCHED"  # set on every rank: print the exit line at the end
EXIT_LINE = re.compile(r"^\[mlx-distill\] rank (\d+) exit (-?\d+)\s*$")

_launched: dict = {}  # {"rank": R} in a rank started by `run --hosts` (see `mark_launched`)


def exit_line(rank: int, code: int) -> str:
    return f"[mlx-distill] rank {rank} exit {code}"


def mark_launched() -> None:
    """In a rank `run --hosts` started (MLX_DISTILL_LAUNCHED set): remember it, and keep the
    variable from this process's own children."""
    if os.environ.pop(LAUNCHED_ENV, None):
        _launched["rank"] = int(os.environ.get("MLX_RANK", 0))


def report_exit(code: int) -> None:
    """This rank's last stderr line, which `run/launch.py` reads (nothing outside such a rank)."""
    if "rank" in _launched:
        sys.stderr.flush()
        print(exit_line(_launched["rank"], code), file=sys.stderr, flush=True)
