"""The runner: the recipe's stages in order, each skipped, resumed or started over.

A stage whose last run finished with the same fingerprint (`fingerprints.py`) is skipped, one
that was interrupted with the same fingerprint resumes (the cache writer and the trainer pick up
where they stopped), and one whose fingerprint changed starts over. Each stage body
(`stages.BODIES`) is handed a `Context` carrying its fingerprint; `stage.json` records the
fingerprint, status, timings (wall time: `seconds`), this process's peak MLX memory during the
stage (`peak_memory_bytes`), versions and the body's summary.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import time
from functools import partial

import mlx.core as mx

from mlx_distill import __version__
from mlx_distill.context import Context, read_stage
from mlx_distill.errors import BadInput, StageIncomplete
from mlx_distill.files import write_json_atomic, write_text_atomic
from mlx_distill.plan import check_recipe, format_table
from mlx_distill.run import side, table
from mlx_distill.run.fingerprints import contents, refuse_stale, stage_inputs
from mlx_distill.run.lock import RunLock
from mlx_distill.run.preflight import check_inputs
from mlx_distill.run.table import TABLE
from mlx_distill.stages import BODIES
from mlx_distill.stages.kinds import teacher_kind
from mlx_distill.train import distributed as dist


def rerun_why(ctx: Context, info: dict | None) -> str | None:
    """Why a finished, current stage runs again: a partial result, or --retry-failed."""
    result = (info or {}).get("result") or {}
    if result.get("complete") is False:
        return "partial (teacher.allow_partial), continuing"
    if ctx.retry_failed and result.get("failed_prompts"):
        return f"--retry-failed: asking the {result['failed_prompts']} failed prompts again"
    return None


def _write_stage(ctx: Context, name: str, info: dict) -> None:
    ctx.stage_dir(name).mkdir(parents=True, exist_ok=True)
    write_json_atomic(ctx.stage_dir(name) / "stage.json", info)


def _versions() -> dict:
    from importlib.metadata import version

    out = {"mlx_distill": __version__, "python": platform.python_version()}
    for pkg in ("mlx", "mlx-lm"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = None
    return out


def _clear(ctx: Context, name: str) -> None:
    keep = TABLE[name].keep
    if keep and ctx.stage_dir(name).is_dir():
        for entry in ctx.stage_dir(name).iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    else:
        shutil.rmtree(ctx.stage_dir(name), ignore_errors=True)
    for extra in TABLE[name].outputs:
        for path in ctx.run_dir.glob(extra):
            shutil.rmtree(path, ignore_errors=True)


def run_stages(ctx: Context, only: list[str] | None = None, force: bool = False) -> dict[str, str]:
    """Run the recipe's stages in order. Returns {stage: 'ran' | 'skipped'}.

    Before anything is written: every input is checked (`preflight`), the run must not be held
    by another process (`RunLock`) and every stage the selected ones read must be up to date.
    The resolved recipe is written only when a stage is about to run.

    In a distributed group every rank runs this; rank 0 alone reads and writes the run's state
    (lock, recipe.yaml, stage.json) and tells the others what it decided (`distributed.on_main`,
    which is also the barrier between stages: no rank starts a stage before rank 0 has written
    what the stage reads).
    """
    recipe = ctx.recipe
    enabled = table.enabled(recipe)
    for name in only or []:
        if name not in enabled:
            raise BadInput(
                f"--stage {name}: not one of this recipe's stages ({', '.join(enabled)})"
            )
    selected = [s for s in enabled if not only or s in only]
    dist.agree(lambda: check_inputs(recipe, selected))  # every host must see the inputs
    made = dist.on_main(lambda: contents(ctx))
    prints, inputs = stage_inputs(recipe, made)

    # Adapter settings mlx-lm cannot build and runs that will not fit stop here, before any work.
    # A side process skips it: its parent planned both runs (and it must watch its parent soon).
    plan = None
    if not side.is_side_process():
        plan = []  # filled on every rank: each checks its own device
        dist.agree(lambda: plan.append(check_recipe(recipe, selected, ctx.jobs)))
        plan = plan[0]

    def current(name: str) -> bool:
        previous = read_stage(ctx, name) or {}
        done = previous.get("status") == "done" and previous.get("fingerprint") == prints[name]
        return done and rerun_why(ctx, previous) is None

    # Rank 0 holds the run; the other ranks of its group work under its lock.
    with RunLock(ctx.run_dir, log=ctx.log) as lock:

        def hold() -> None:
            lock.check()
            if only:
                refuse_stale(ctx, selected, enabled, prints, inputs)
            if any(force or not current(s) for s in selected):
                lock.claim()
                if not lock.inherited:  # a side process runs its parent's resolved recipe
                    write_text_atomic(ctx.run_dir / "recipe.yaml", ctx.recipe.to_yaml())
            if plan is not None:
                ctx.log(format_table(plan))

        dist.on_main(hold)
        if dist.world() > 1:
            dist.check_shared_dir(ctx.run_dir)
        return _run_selected(ctx, selected, prints, inputs, force, current, made)


def every_rank(ctx: Context, name: str) -> bool:
    """Whether every rank of a group works on stage `name`, or rank 0 alone while the others
    wait (`table.Stage.ranks`)."""
    ranks = TABLE[name].ranks
    if ranks == "teacher":
        return teacher_kind(ctx.recipe.teacher.kind).data_parallel
    return ranks == "all"


def _start(ctx: Context, name: str, fp: str, inputs: dict, force: bool, current) -> dict | None:
    """Decide whether stage `name` runs (None: up to date, skipped); if it does, clear what a
    fresh start replaces and record it as running. Returns its stage.json so far."""
    previous = read_stage(ctx, name)
    done = previous is not None and previous.get("status") == "done"
    if current(name) and not force:
        ctx.log(f"[{name}] up to date (fingerprint {fp}), skipped")
        return None
    rerun = rerun_why(ctx, previous) if done else None
    if rerun:
        ctx.log(f"[{name}] {rerun}")
    same = previous is not None and previous.get("fingerprint") == fp
    resuming = same and (not done or rerun is not None)
    if not resuming or force:
        _clear(ctx, name)
    ctx.log(f"[{name}] {'resuming' if resuming and not force else 'running'}")
    info = {"stage": name, "fingerprint": fp, "status": "running", "started": time.time()}
    info["versions"] = _versions()
    info["inputs"] = inputs[name]
    _write_stage(ctx, name, info)
    return info


def _finish(ctx: Context, name: str, info: dict, result: dict) -> dict:
    info.update(status="done", finished=time.time())
    info["seconds"] = round(info["finished"] - info["started"], 2)
    info["result"] = result
    _write_stage(ctx, name, info)
    ctx.log(f"[{name}] done in {info['seconds']:.1f}s")
    return result


def run_body(ctx: Context, name: str) -> dict:
    """Stage `name`'s body, handed a context that carries its fingerprint; on every rank or on
    rank 0 alone (`every_rank`)."""
    if every_rank(ctx, name):
        return BODIES[name](ctx) or {}
    return dist.on_main(partial(BODIES[name], ctx)) or {}


def _run_selected(ctx, selected, prints, inputs, force, current, made) -> dict[str, str]:
    outcome: dict[str, str] = {}
    proc: subprocess.Popen | None = None  # the baseline, training beside the KD student
    for name in selected:
        fp = prints[name]
        if name == "baseline" and proc is not None:
            outcome[name] = _join_side(ctx, proc, name, fp)
            proc = None
            continue
        info = dist.on_main(partial(_start, ctx, name, fp, inputs, force, current))
        if info is None:
            outcome[name] = "skipped"
            continue
        baseline_pending = "baseline" in selected and (force or not current("baseline"))
        if name == "distill" and ctx.jobs > 1 and baseline_pending:  # jobs is 1 in a group
            proc = _spawn_side(ctx, "baseline", force)
        try:
            with side.blas_share(proc is not None):
                mx.reset_peak_memory()
                # rank 0's fingerprint on every rank (each rank hashed its own copy of the files)
                result = run_body(dataclasses.replace(ctx, fingerprint=info["fingerprint"]), name)
                info["peak_memory_bytes"] = int(mx.get_peak_memory())  # this process's
        except BaseException as e:
            if dist.is_main():
                status = "incomplete" if isinstance(e, StageIncomplete) else "failed"
                info.update(status=status, error=f"{type(e).__name__}: {e}"[:1000])
                _write_stage(ctx, name, info)
            if proc is not None:
                side.stop(proc)
            raise
        # Rank 0's result (its stage.json) on every rank, once every rank is done.
        dist.barrier()
        result = dist.on_main(partial(_finish, ctx, name, info, result))
        outcome[name] = "ran"
        if result.get("content") and result["content"] != made.get(name):
            made[name] = result["content"]  # what it made changed: so do downstream prints
            new_prints, new_inputs = stage_inputs(ctx.recipe, made)
            prints.update(new_prints)
            inputs.update(new_inputs)
    return outcome


def _spawn_side(ctx: Context, name: str, force: bool) -> subprocess.Popen:
    """Run stage `name` of the resolved recipe in a second process (same run directory), under
    this process's run lock; it exits when this process dies."""
    cmd = [sys.executable, "-m", "mlx_distill", "run", str(ctx.run_dir / "recipe.yaml")]
    cmd += ["--stage", name, "--jobs", "1", "--bar-position", str(ctx.bar_position + 1)]
    cmd += ["--force"] if force else []
    cmd += [] if ctx.progress else ["--no-progress"]
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(side.half_cores()[1]))
    proc = side.spawn_side(cmd, env)
    ctx.log(f"[{name}] running beside distill (second process, pid {proc.pid})")
    return proc


def _join_side(ctx: Context, proc: subprocess.Popen, name: str, fp: str) -> str:
    """Wait for a side process; its stage must have finished with the expected fingerprint."""
    code = proc.wait()
    side.close_side(proc)
    info = read_stage(ctx, name) or {}
    if code != 0 or info.get("status") != "done" or info.get("fingerprint") != fp:
        message = f"stage {name} failed in its side process (exit code {code}; error above)"
        raise (BadInput if code == 2 else RuntimeError)(message)
    return "ran"  # the side process logged its own "done" line
