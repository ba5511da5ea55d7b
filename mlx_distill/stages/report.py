"""The report stage: report.md and its loss curves from the eval results and the stages'
summaries (`mlx_distill.report` renders them)."""

from __future__ import annotations

import json

from mlx_distill.context import Context, stage_result
from mlx_distill.report import write_report
from mlx_distill.stages.eval import run_models


def stage_report(ctx: Context) -> dict:
    results = json.loads((ctx.stage_dir("eval") / "results.json").read_text())
    stages = {name: stage_result(ctx, name) for name in ("teacher", "cache", "distill", "baseline")}
    return write_report(ctx.recipe, ctx.run_dir, results, stages, run_models(ctx))
