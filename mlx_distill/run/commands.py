"""The run-directory plumbing of the commands that work on a finished run: `mlx-distill eval
PATH` and `mlx-distill cache repair PATH`. Each checks what it reads is current and holds the
run's lock, as `run_stages` does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mlx_distill.cache import format as fmt
from mlx_distill.cache import verify_cache
from mlx_distill.context import Context, read_stage
from mlx_distill.errors import BadInput
from mlx_distill.files import file_sha256
from mlx_distill.recipe import load_recipe
from mlx_distill.run import table
from mlx_distill.run.fingerprints import rebuild_command, refuse_stale, stage_inputs, why_stale
from mlx_distill.run.lock import RunLock
from mlx_distill.run.preflight import check_inputs
from mlx_distill.stages import BODIES
from mlx_distill.stages.eval import evaluate_run
from mlx_distill.stages.report import stage_report
from mlx_distill.train import distributed as dist


def run_context(run_dir: Path, progress: bool = True) -> Context:
    """A Context for an existing run directory, from its resolved recipe.yaml."""
    resolved = run_dir / "recipe.yaml"
    if not resolved.is_file():
        raise BadInput(f"{run_dir} is not a run directory (no recipe.yaml); run a recipe first")
    recipe = load_recipe(resolved)
    recipe.runs_dir = str(run_dir.parent)
    recipe.name = run_dir.name
    return Context(recipe, run_dir, progress=progress, recipe_path=str(resolved))


def evaluate_in_place(run_dir: Path, progress: bool = True) -> dict:
    """`mlx-distill eval PATH`: evaluate a run directory again and rewrite its report.

    Refused while another process holds the run, or when a model in it is not the one its
    recipe.yaml describes (the recipe changed since it was trained).
    """
    ctx = run_context(Path(run_dir), progress and dist.is_main())
    if not dist.is_main():
        ctx.log = lambda msg: None
    enabled = table.enabled(ctx.recipe)
    dist.agree(lambda: check_inputs(ctx.recipe, ["eval"]))
    prints, inputs = stage_inputs(ctx.recipe)
    with RunLock(ctx.run_dir, log=ctx.log) as lock:

        def hold() -> None:  # rank 0 holds the run for its whole group
            lock.check()
            refuse_stale(ctx, ["eval"], enabled, prints, inputs)
            lock.claim()

        dist.on_main(hold)
        results = evaluate_run(ctx)  # in a group: every rank its share of the problems
        dist.on_main(lambda: stage_report(ctx))
    return results


def repair_cache(cache_dir: Path, progress: bool = True) -> dict:
    """`mlx-distill cache repair PATH`: rescore only the missing or damaged shards of a run's
    teacher cache (PATH = runs/NAME/cache), keeping every intact shard as it is."""
    cache_dir = Path(cache_dir)
    manifest = fmt.read_json_manifest(cache_dir)  # names the path if it is not a cache
    if manifest.get("kind") != "tokens":
        raise BadInput(
            f"{cache_dir} holds {manifest.get('kind')!r} records, not token targets; rerun "
            "`mlx-distill teach` to fill in missing teacher answers"
        )
    ctx = run_context(cache_dir.parent, progress)
    if ctx.stage_dir("cache").resolve() != cache_dir.resolve():
        raise BadInput(f"{cache_dir}: not the cache folder of run {ctx.run_dir}")
    damaged = [
        s["file"]
        for s in manifest.get("shards", [])
        if not (cache_dir / s["file"]).is_file()
        or file_sha256(cache_dir / s["file"]) != s.get("sha256")
    ]
    prints, inputs = stage_inputs(ctx.recipe)
    enabled = table.enabled(ctx.recipe)
    with RunLock(ctx.run_dir, log=ctx.log) as lock:
        lock.check()
        info = read_stage(ctx, "cache") or {}
        if info.get("fingerprint") != prints["cache"]:
            raise BadInput(
                f"{why_stale(ctx, 'cache', prints, inputs)}; the cache cannot be repaired, "
                f"rebuild it: {rebuild_command(ctx, ['cache'])}"
            )
        refuse_stale(ctx, ["cache"], enabled, prints, inputs)
        if damaged or not manifest.get("complete"):
            lock.claim()
            ctx.log(f"[cache] rebuilding {len(damaged)} damaged shard(s): {', '.join(damaged)}")
            # keeps intact shards, rescoring only the rest
            BODIES["cache"](dataclasses.replace(ctx, fingerprint=prints["cache"]))
    return dict(verify_cache(cache_dir), repaired=damaged)
