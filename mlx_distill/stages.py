"""The stage runner: order, fingerprints, skip-if-done, resume, --force.

A stage's fingerprint hashes its recipe sections, the recipe seed, the content of the data files
it reads and its upstream stages' fingerprints. `runs/<name>/<stage>/stage.json` records the
fingerprint and status; a stage whose last run finished with the same fingerprint is skipped,
one that was interrupted with the same fingerprint resumes (the cache writer and the trainer pick
up where they stopped), and one whose fingerprint changed starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from mlx_distill import __version__
from mlx_distill.context import Context, read_stage
from mlx_distill.errors import BadInput, StageIncomplete
from mlx_distill.recipe import STAGES, DistillMode, Recipe, choices, fingerprint

SECTIONS = {
    "tokenizer": ("data", "tokenizer"),
    "teacher": ("teacher", "data"),
    "cache": ("cache", "data"),
    "distill": ("student", "loss", "distill", "train", "data", "export"),
    "baseline": ("student", "train", "data"),
    "eval": ("eval", "data"),
    "report": (),
}
UPSTREAM = {
    "tokenizer": (),
    "teacher": ("tokenizer",),
    "cache": ("teacher",),
    "distill": ("cache",),
    "baseline": ("tokenizer", "teacher"),
    "eval": ("teacher", "distill", "baseline"),
    "report": ("eval", "distill", "baseline"),
}
# Folders a stage writes besides its own; cleared when it starts over.
OUTPUTS = {
    "teacher": ("checkpoints/teacher",),
    "distill": (
        *("student", "student-q4", "student-q8", "student-adapters", "checkpoints/distill"),
        # distill.compare's runs (glob patterns): student-<mode>[-n][-adapters]
        *(f"student-{mode}*" for mode in choices(DistillMode)),
        "checkpoints/distill-*",
    ),
    "baseline": ("checkpoints/baseline", "baseline-adapters"),
}
# Entries of a stage folder that starting over never deletes: an API teacher's paid-for answers
# (their keys say which model and parameters made them; a rerun reads the ones it needs).
KEEP = {"teacher": ("records",)}


def _file_digest(path: str | None) -> str:
    if path is None:
        return "unset"
    p = Path(path)
    if not p.is_file():
        return "missing"
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def stage_inputs(
    recipe: Recipe, contents: dict[str, str] | None = None
) -> tuple[dict[str, str], dict[str, dict]]:
    """(fingerprint, inputs) of every stage, upstream first; the inputs are what is hashed.

    The teacher section is what the teacher kind says its output depends on
    (`TeacherKind.fingerprint_parts`: no cost caps, rate limits or endpoints). contents:
    {stage: digest of what it produced} for stages whose output can grow under one
    fingerprint (a teacher continued after a stop); the stages downstream hash it.
    """
    from mlx_distill.teachers import teacher_kind

    data_files = {k: _file_digest(getattr(recipe.data, k)) for k in ("train", "valid", "test")}
    teacher_section, teacher_files = teacher_kind(recipe.teacher.kind).fingerprint_parts(recipe)
    contents = contents or {}
    prints: dict[str, str] = {}
    inputs: dict[str, dict] = {}
    resolved = recipe.to_dict()
    resolved["teacher"] = teacher_section
    # Keys added since: left out at their defaults, so existing runs keep their fingerprints.
    if not resolved["distill"]["compare"]:
        del resolved["distill"]["compare"]
    if not resolved["distill"]["offline_steps"]:
        del resolved["distill"]["offline_steps"]
    for entry in resolved["distill"].get("compare", []):
        if entry["offline_steps"] is None:
            del entry["offline_steps"]
    for name in STAGES:
        payload = {
            "stage": name,
            "sections": {k: resolved[k] for k in SECTIONS[name]},
            "seed": recipe.seed,
            "upstream": {u: prints[u] for u in UPSTREAM[name]},
        }
        produced = {u: contents[u] for u in UPSTREAM[name] if contents.get(u)}
        if produced:
            payload["upstream_content"] = produced
        if "data" in SECTIONS[name]:
            payload["data_files"] = data_files
        if name == "teacher":
            payload["teacher_files"] = teacher_files
        prints[name] = fingerprint(payload)
        inputs[name] = payload
    return prints, inputs


def stage_fingerprints(recipe: Recipe) -> dict[str, str]:
    """Fingerprint of every stage, upstream first."""
    return stage_inputs(recipe)[0]


def _contents(ctx: Context) -> dict[str, str]:
    """{stage: result["content"]} of the stages that report one."""
    out = {}
    for name in STAGES:
        content = ((read_stage(ctx, name) or {}).get("result") or {}).get("content")
        if content:
            out[name] = content
    return out


def _rerun_why(ctx: Context, info: dict | None) -> str | None:
    """Why a finished, current stage runs again: a partial result, or --retry-failed."""
    result = (info or {}).get("result") or {}
    if result.get("complete") is False:
        return "partial (teacher.allow_partial), continuing"
    if ctx.retry_failed and result.get("failed_prompts"):
        return f"--retry-failed: asking the {result['failed_prompts']} failed prompts again"
    return None


def _write_stage(ctx: Context, name: str, info: dict) -> None:
    path = ctx.stage_dir(name) / "stage.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(path)


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
    keep = KEEP.get(name, ())
    if keep and ctx.stage_dir(name).is_dir():
        for entry in ctx.stage_dir(name).iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    else:
        shutil.rmtree(ctx.stage_dir(name), ignore_errors=True)
    for extra in OUTPUTS.get(name, ()):
        for path in ctx.run_dir.glob(extra):
            shutil.rmtree(path, ignore_errors=True)


# What each stage makes, for "... since <it> was <made>" in a refusal.
MADE = {
    "tokenizer": "the tokenizer stage ran",
    "teacher": "the teacher stage ran",
    "cache": "the teacher cache was built",
    "distill": "the KD student was trained",
    "baseline": "the baseline was trained",
    "eval": "the evaluation ran",
    "report": "the report was written",
}
TEACH_GROUP = ("tokenizer", "teacher", "cache")


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def _shown(value) -> str:
    if value is None:
        return "null"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def why_stale(ctx: Context, name: str, prints: dict, inputs: dict) -> str:
    """Why stage `name` is not up to date, in words: the recipe fields (both values), data files
    or upstream stages that changed since it ran, or that it never finished."""
    previous = read_stage(ctx, name)
    if previous is None:
        return f"the {name} stage has not run yet"
    if previous.get("fingerprint") == prints[name]:
        why = f": {previous['error']}" if previous.get("error") else ""
        return f"the {name} stage did not finish (status {previous.get('status')!r}{why})"
    old = previous.get("inputs")
    if not isinstance(old, dict):
        return f"the recipe or the data changed since {MADE[name]}"
    new = inputs[name]
    changes = []
    before, after = _flat(old.get("sections", {})), _flat(new["sections"])
    for key in [k for k in after if k in before] + [k for k in after if k not in before]:
        if key not in before:  # a key this version of the schema added
            changes.append(f"new recipe key {key} = {_shown(after[key])}")
        elif before[key] != after[key]:
            changes.append(f"{key} changed {_shown(before[key])} -> {_shown(after[key])}")
    if old.get("seed") != new["seed"]:
        changes.append(f"seed changed {old.get('seed')} -> {new['seed']}")
    for split, digest in new.get("data_files", {}).items():
        path_changed = before.get(f"data.{split}") != after.get(f"data.{split}")
        if old.get("data_files", {}).get(split) != digest and not path_changed:
            path = getattr(ctx.recipe.data, split)
            changes.append(f"the content of data.{split} ({path}) changed")
    if old.get("teacher_files") != new.get("teacher_files", old.get("teacher_files")):
        changes.append("the teacher's weights or config.json changed")
    for upstream, fp in new["upstream"].items():
        if old.get("upstream", {}).get(upstream) != fp:
            changes.append(f"the {upstream} stage was rerun")
    if not changes:
        return f"the recipe changed since {MADE[name]}"
    shown = changes[:3] + ([f"{len(changes) - 3} more"] if len(changes) > 3 else [])
    listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
    return f"{listed} since {MADE[name]}"


def rebuild_command(ctx: Context, stale: list[str]) -> str:
    """The command that reruns the `stale` stages with the same recipe and overrides."""
    import shlex

    if len(stale) > 1 and set(stale) <= set(TEACH_GROUP):
        cmd = ["mlx-distill", "teach", ctx.recipe_path]
    else:
        cmd = ["mlx-distill", "run", ctx.recipe_path]
        for name in stale:
            cmd += ["--stage", name]
    for item in ctx.overrides:
        cmd += ["--set", item]
    return shlex.join(cmd)


def refuse_stale(ctx: Context, selected: list[str], enabled: list[str], prints, inputs) -> None:
    """BadInput if a stage that `selected` read from (and does not run) is not up to date:
    the first such stage, why (fields with both values), and the command that rebuilds it."""
    needed = [s for s in _upstream_of(selected, enabled) if s not in selected]
    stale = []
    for name in needed:
        info = read_stage(ctx, name) or {}
        if info.get("status") != "done" or info.get("fingerprint") != prints[name]:
            stale.append(name)
    if not stale:
        return
    readers = [s for s in selected if stale[0] in _upstream_of([s], enabled)]
    what = " and ".join(readers) + (" stages read" if len(readers) > 1 else " stage reads")
    reason = why_stale(ctx, stale[0], prints, inputs)
    verb = "build" if reason.endswith("has not run yet") else "rebuild"
    also = f" (with {', '.join(stale[1:])})" if len(stale) > 1 else ""
    raise BadInput(
        f"{reason}; the {what} it, so {verb} it{also} first: {rebuild_command(ctx, stale)}"
    )


def _upstream_of(names: list[str], enabled: list[str]) -> list[str]:
    """Enabled stages that `names` read from, transitively, in stage order."""
    needed: set[str] = set()
    frontier = list(names)
    while frontier:
        for upstream in UPSTREAM[frontier.pop()]:
            if upstream in enabled and upstream not in needed:
                needed.add(upstream)
                frontier.append(upstream)
    return [s for s in enabled if s in needed]


def _write_recipe(ctx: Context) -> None:
    resolved = ctx.run_dir / "recipe.yaml"
    resolved.with_suffix(".tmp").write_text(ctx.recipe.to_yaml())
    resolved.with_suffix(".tmp").replace(resolved)


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
    from mlx_distill.preflight import check_inputs
    from mlx_distill.runlock import PARENT_ENV, RunLock
    from mlx_distill.train import distributed as dist

    recipe = ctx.recipe
    enabled = [s for s in STAGES if s in recipe.stages]
    for name in only or []:
        if name not in enabled:
            raise BadInput(
                f"--stage {name}: not one of this recipe's stages ({', '.join(enabled)})"
            )
    selected = [s for s in enabled if not only or s in only]
    dist.agree(lambda: check_inputs(recipe, selected))  # every host must see the inputs
    contents = dist.on_main(lambda: _contents(ctx))
    prints, inputs = stage_inputs(recipe, contents)
    from mlx_distill.plan import check_recipe, format_table

    # Adapter settings mlx-lm cannot build and runs that will not fit stop here, before any work.
    # A side process skips it: its parent planned both runs (and it must watch its parent soon).
    side_process = bool(os.environ.get(PARENT_ENV))
    plan = None
    if not side_process:
        plan = []  # filled on every rank: each checks its own device
        dist.agree(lambda: plan.append(check_recipe(recipe, selected, ctx.jobs)))
        plan = plan[0]

    def current(name: str) -> bool:
        previous = read_stage(ctx, name) or {}
        done = previous.get("status") == "done" and previous.get("fingerprint") == prints[name]
        return done and _rerun_why(ctx, previous) is None

    # Rank 0 holds the run; the other ranks of its group work under its lock.
    with RunLock(ctx.run_dir, log=ctx.log) as lock:

        def hold() -> None:
            lock.check()
            if only:
                refuse_stale(ctx, selected, enabled, prints, inputs)
            if any(force or not current(s) for s in selected):
                lock.claim()
                if not lock.inherited:  # a side process runs its parent's resolved recipe
                    _write_recipe(ctx)
            if plan is not None:
                ctx.log(format_table(plan))

        dist.on_main(hold)
        if dist.world() > 1:
            dist.check_shared_dir(ctx.run_dir)
        return _run_selected(ctx, enabled, selected, prints, inputs, force, current, contents)


def _every_rank(ctx: Context, name: str) -> bool:
    """Whether every rank of a group works on stage `name` (its share of the rows, batches or
    problems), or rank 0 alone while the others wait."""
    from mlx_distill.teachers import teacher_kind

    if name in ("teacher", "cache"):
        return teacher_kind(ctx.recipe.teacher.kind).data_parallel
    return name in ("distill", "baseline", "eval")


def _start(ctx: Context, name: str, fp: str, inputs: dict, force: bool, current) -> dict | None:
    """Decide whether stage `name` runs (None: up to date, skipped); if it does, clear what a
    fresh start replaces and record it as running. Returns its stage.json so far."""
    previous = read_stage(ctx, name)
    done = previous is not None and previous.get("status") == "done"
    if current(name) and not force:
        ctx.log(f"[{name}] up to date (fingerprint {fp}), skipped")
        return None
    rerun = _rerun_why(ctx, previous) if done else None
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


def _run_selected(
    ctx, enabled, selected, prints, inputs, force, current, contents
) -> dict[str, str]:
    from mlx_distill.pipeline import STAGE_FUNCTIONS
    from mlx_distill.train import distributed as dist

    outcome: dict[str, str] = {}
    side: subprocess.Popen | None = None  # the baseline, training beside the KD student
    for name in selected:
        fp = prints[name]
        if name == "baseline" and side is not None:
            outcome[name] = _join_side(ctx, side, name, fp)
            side = None
            continue
        info = dist.on_main(partial(_start, ctx, name, fp, inputs, force, current))
        if info is None:
            outcome[name] = "skipped"
            continue
        baseline_pending = "baseline" in selected and (force or not current("baseline"))
        if name == "distill" and ctx.jobs > 1 and baseline_pending:  # jobs is 1 in a group
            side = _spawn_side(ctx, "baseline", force)
        try:
            with _blas_share(side is not None):
                if _every_rank(ctx, name):
                    result = STAGE_FUNCTIONS[name](ctx) or {}
                else:
                    result = dist.on_main(partial(STAGE_FUNCTIONS[name], ctx)) or {}
        except BaseException as e:
            if dist.is_main():
                status = "incomplete" if isinstance(e, StageIncomplete) else "failed"
                info.update(status=status, error=f"{type(e).__name__}: {e}"[:1000])
                _write_stage(ctx, name, info)
            if side is not None:
                side.terminate()  # it checkpoints as it goes; a rerun resumes it
                side.wait()
                _close_side(side)
            raise
        # Rank 0's result (its stage.json) on every rank, once every rank is done.
        dist.barrier()
        result = dist.on_main(partial(_finish, ctx, name, info, result))
        outcome[name] = "ran"
        if result.get("content") and result["content"] != contents.get(name):
            contents[name] = result["content"]  # what it made changed: so do downstream prints
            new_prints, new_inputs = stage_inputs(ctx.recipe, contents)
            prints.update(new_prints)
            inputs.update(new_inputs)
    return outcome


def _half_cores() -> tuple[int, int]:
    n = os.cpu_count() or 1
    return max(1, n // 2), max(1, n - n // 2)


class _blas_share:
    """While a side process trains, this process keeps half of the BLAS threads."""

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self):
        from mlx_distill import backend

        self.before = backend.blas_threads() if self.active else None
        if self.active:
            backend.set_blas_threads(_half_cores()[0])

    def __exit__(self, *exc):
        from mlx_distill import backend

        if self.active:  # the count it had (OPENBLAS_NUM_THREADS), not the core count
            backend.set_blas_threads(self.before or os.cpu_count() or 1)


def _close_side(proc: subprocess.Popen) -> None:
    from mlx_distill.runlock import close_side

    close_side(proc)


def _spawn_side(ctx: Context, name: str, force: bool) -> subprocess.Popen:
    """Run stage `name` of the resolved recipe in a second process (same run directory).

    Distill and baseline share no state: each reads the upstream stages and writes its own
    folders, so they can train side by side. On a 2-core CPU this nearly halves their wall
    time, since a step of a small model cannot keep both cores busy. The child works under this
    process's run lock and exits when this process dies (`runlock.spawn_side`).
    """
    from mlx_distill.runlock import spawn_side

    cmd = [sys.executable, "-m", "mlx_distill", "run", str(ctx.run_dir / "recipe.yaml")]
    cmd += ["--stage", name, "--jobs", "1", "--bar-position", str(ctx.bar_position + 1)]
    cmd += ["--force"] if force else []
    cmd += [] if ctx.progress else ["--no-progress"]
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(_half_cores()[1]))
    proc = spawn_side(cmd, env)  # works under this run's lock; exits if this process dies
    ctx.log(f"[{name}] running beside distill (second process, pid {proc.pid})")
    return proc


def _join_side(ctx: Context, proc: subprocess.Popen, name: str, fp: str) -> str:
    """Wait for a side process; its stage must have finished with the expected fingerprint."""
    code = proc.wait()
    _close_side(proc)
    info = read_stage(ctx, name) or {}
    if code != 0 or info.get("status") != "done" or info.get("fingerprint") != fp:
        message = f"stage {name} failed in its side process (exit code {code}; error above)"
        raise (BadInput if code == 2 else RuntimeError)(message)
    return "ran"  # the side process logged its own "done" line


def _run_context(run_dir: Path, progress: bool = True) -> Context:
    """A Context for an existing run directory, from its resolved recipe.yaml."""
    from mlx_distill.recipe import load_recipe

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
    from mlx_distill.evaluate import evaluate_run
    from mlx_distill.preflight import check_inputs
    from mlx_distill.report import write_report
    from mlx_distill.runlock import RunLock
    from mlx_distill.train import distributed as dist

    ctx = _run_context(Path(run_dir), progress and dist.is_main())
    if not dist.is_main():
        ctx.log = lambda msg: None
    enabled = [s for s in STAGES if s in ctx.recipe.stages]
    dist.agree(lambda: check_inputs(ctx.recipe, ["eval"]))
    prints, inputs = stage_inputs(ctx.recipe)
    with RunLock(ctx.run_dir, log=ctx.log) as lock:

        def hold() -> None:  # rank 0 holds the run for its whole group
            lock.check()
            refuse_stale(ctx, ["eval"], enabled, prints, inputs)
            lock.claim()

        dist.on_main(hold)
        results = evaluate_run(ctx)  # in a group: every rank its share of the problems
        dist.on_main(lambda: write_report(ctx))
    return results


def repair_cache(cache_dir: Path, progress: bool = True) -> dict:
    """`mlx-distill cache repair PATH`: rescore only the missing or damaged shards of a run's
    teacher cache (PATH = runs/NAME/cache), keeping every intact shard as it is."""
    from mlx_distill.cache import format as fmt
    from mlx_distill.cache import verify_cache
    from mlx_distill.pipeline import STAGE_FUNCTIONS
    from mlx_distill.runlock import RunLock

    cache_dir = Path(cache_dir)
    manifest = fmt.read_json_manifest(cache_dir)  # names the path if it is not a cache
    if manifest.get("kind") != "tokens":
        raise BadInput(
            f"{cache_dir} holds {manifest.get('kind')!r} records, not token targets; rerun "
            "`mlx-distill teach` to fill in missing teacher answers"
        )
    ctx = _run_context(cache_dir.parent, progress)
    if ctx.stage_dir("cache").resolve() != cache_dir.resolve():
        raise BadInput(f"{cache_dir}: not the cache folder of run {ctx.run_dir}")
    damaged = [
        s["file"]
        for s in manifest.get("shards", [])
        if not (cache_dir / s["file"]).is_file()
        or fmt.file_sha256(cache_dir / s["file"]) != s.get("sha256")
    ]
    prints, inputs = stage_inputs(ctx.recipe)
    enabled = [s for s in STAGES if s in ctx.recipe.stages]
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
            STAGE_FUNCTIONS["cache"](ctx)  # keeps intact shards, rescoring only the rest
    return dict(verify_cache(cache_dir), repaired=damaged)
