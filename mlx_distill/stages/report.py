"""The report stage: report.md and its loss curves from the eval results and the stages'
summaries (`mlx_distill.report` renders them)."""

from __future__ import annotations

import json

from mlx_distill.context import Context, read_stage, stage_result
from mlx_distill.recipe import STAGES
from mlx_distill.report import write_report
from mlx_distill.stages.eval import run_models


def stage_report(ctx: Context) -> dict:
    results = json.loads((ctx.stage_dir("eval") / "results.json").read_text())
    stages = {name: stage_result(ctx, name) for name in ("teacher", "cache", "distill", "baseline")}
    done = {name: read_stage(ctx, name) for name in STAGES if name in ctx.recipe.stages}
    done = {name: info for name, info in done.items() if info and info.get("status") == "done"}
    return write_report(ctx.recipe, ctx.run_dir, results, stages, run_models(ctx), done)
