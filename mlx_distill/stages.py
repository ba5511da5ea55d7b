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
from pathlib import Path

from mlx_distill import __version__
from mlx_distill.context import Context, read_stage
from mlx_distill.errors import BadInput
from mlx_distill.recipe import STAGES, Recipe, fingerprint

SECTIONS = {
    "tokenizer": ("data", "tokenizer"),
    "teacher": ("teacher", "data"),
    "cache": ("cache", "data"),
    "distill": ("student", "loss", "train", "data", "export"),
    "baseline": ("student", "train", "baseline", "data"),
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
    "distill": ("student", "student-q4", "student-q8", "checkpoints/distill"),
    "baseline": ("checkpoints/baseline",),
}


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


def stage_fingerprints(recipe: Recipe) -> dict[str, str]:
    """Fingerprint of every stage, upstream first."""
    data_files = {k: _file_digest(getattr(recipe.data, k)) for k in ("train", "valid", "test")}
    teacher_files = {}
    if recipe.teacher.kind == "local" and (recipe.teacher.path or recipe.teacher.init):
        teacher_dir = Path(recipe.teacher.path or recipe.teacher.init)
        for f in sorted(teacher_dir.glob("*.safetensors")) + [teacher_dir / "config.json"]:
            teacher_files[f.name] = _file_digest(str(f))
    prints: dict[str, str] = {}
    for name in STAGES:
        payload = {
            "stage": name,
            "sections": {k: recipe.to_dict()[k] for k in SECTIONS[name]},
            "seed": recipe.seed,
            "upstream": {u: prints[u] for u in UPSTREAM[name]},
        }
        if "data" in SECTIONS[name]:
            payload["data_files"] = data_files
        if name == "teacher":
            payload["teacher_files"] = teacher_files
        prints[name] = fingerprint(payload)
    return prints


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
    shutil.rmtree(ctx.stage_dir(name), ignore_errors=True)
    for extra in OUTPUTS.get(name, ()):
        shutil.rmtree(ctx.run_dir / extra, ignore_errors=True)


def _preflight(recipe: Recipe, stages: list[str]) -> None:
    """Check the input files before anything is written: fail fast, leave nothing behind."""
    from mlx_distill.text.data import read_jsonl

    data = recipe.data
    needs = {"train": {"tokenizer", "teacher", "cache", "distill", "baseline"}, "test": {"eval"}}
    for split, users in needs.items():
        if users & set(stages):
            if getattr(data, split) is None:
                used_by = ", ".join(s for s in STAGES if s in users & set(stages))
                raise BadInput(f"recipe key data.{split}: not set (the {used_by} stage reads it)")
            path = Path(getattr(data, split))
            if not path.is_file():
                raise BadInput(f"recipe key data.{split}: data file not found: {path}")
            read_jsonl(path)  # a malformed line fails here, naming file and line
    local_teacher = recipe.teacher.path if recipe.teacher.kind == "local" else None
    for key, value in (("tokenizer.path", recipe.tokenizer.path), ("teacher.path", local_teacher)):
        if value and not Path(value).is_dir():
            raise BadInput(f"recipe key {key}: folder not found: {value}")
    if recipe.tokenizer.path and local_teacher and {"teacher", "cache"} & set(stages):
        from mlx_distill.text.tokenizer import load_tokenizer, vocab_hash

        student, teacher = (
            vocab_hash(load_tokenizer(p)) for p in (recipe.tokenizer.path, local_teacher)
        )
        if student != teacher:
            raise BadInput(
                f"the student's tokenizer ({recipe.tokenizer.path}, vocab hash {student}) does not "
                f"match the teacher's ({local_teacher}, {teacher})"
            )


def run_stages(ctx: Context, only: list[str] | None = None, force: bool = False) -> dict[str, str]:
    """Run the recipe's stages in order. Returns {stage: 'ran' | 'skipped'}."""
    from mlx_distill.pipeline import STAGE_FUNCTIONS

    recipe = ctx.recipe
    enabled = [s for s in STAGES if s in recipe.stages]
    for name in only or []:
        if name not in enabled:
            raise BadInput(
                f"--stage {name}: not one of this recipe's stages ({', '.join(enabled)})"
            )
    _preflight(recipe, [s for s in enabled if not only or s in only])
    prints = stage_fingerprints(recipe)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    resolved = ctx.run_dir / "recipe.yaml"
    resolved.with_suffix(".tmp").write_text(recipe.to_yaml())
    resolved.with_suffix(".tmp").replace(resolved)

    needed: set[str] = set()  # stages the selected ones read from, transitively
    frontier = list(only or [])
    while frontier:
        for upstream in UPSTREAM[frontier.pop()]:
            if upstream in enabled and upstream not in needed:
                needed.add(upstream)
                frontier.append(upstream)

    def pending(name: str) -> bool:
        """Will this call run `name` (selected, and not up to date or forced)?"""
        if name not in enabled or (only and name not in only):
            return False
        previous = read_stage(ctx, name) or {}
        current = previous.get("status") == "done" and previous.get("fingerprint") == prints[name]
        return force or not current

    outcome: dict[str, str] = {}
    side: subprocess.Popen | None = None  # the baseline, training beside the KD student
    for name in enabled:
        fp = prints[name]
        if name == "baseline" and side is not None:
            outcome[name] = _join_side(ctx, side, name, fp)
            side = None
            continue
        previous = read_stage(ctx, name)
        done = previous is not None and previous.get("status") == "done"
        up_to_date = done and previous.get("fingerprint") == fp
        if only and name not in only:
            if name in needed and not up_to_date:
                raise BadInput(
                    f"stage {name!r} is not up to date and --stage skips it; run it first "
                    f"(mlx-distill run RECIPE --stage {name})"
                )
            continue
        if up_to_date and not force:
            ctx.log(f"[{name}] up to date (fingerprint {fp}), skipped")
            outcome[name] = "skipped"
            continue
        resuming = previous is not None and previous.get("fingerprint") == fp and not done
        if not resuming or force:
            _clear(ctx, name)
        ctx.log(f"[{name}] {'resuming' if resuming and not force else 'running'}")
        started = time.time()
        info = {"stage": name, "fingerprint": fp, "status": "running", "started": started}
        info["versions"] = _versions()
        _write_stage(ctx, name, info)
        if name == "distill" and ctx.jobs > 1 and pending("baseline"):
            side = _spawn_side(ctx, "baseline", force)
        try:
            with _blas_share(side is not None):
                result = STAGE_FUNCTIONS[name](ctx) or {}
        except BaseException as e:
            info.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
            _write_stage(ctx, name, info)
            if side is not None:
                side.terminate()  # it checkpoints as it goes; a rerun resumes it
                side.wait()
            raise
        info.update(status="done", finished=time.time(), seconds=round(time.time() - started, 2))
        info["result"] = result
        _write_stage(ctx, name, info)
        ctx.log(f"[{name}] done in {info['seconds']:.1f}s")
        outcome[name] = "ran"
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

        if self.active:
            backend.set_blas_threads(_half_cores()[0])

    def __exit__(self, *exc):
        from mlx_distill import backend

        if self.active:
            backend.set_blas_threads(os.cpu_count() or 1)


def _spawn_side(ctx: Context, name: str, force: bool) -> subprocess.Popen:
    """Run stage `name` of the resolved recipe in a second process (same run directory).

    Distill and baseline share no state: each reads the upstream stages and writes its own
    folders, so they can train side by side. On a 2-core CPU this nearly halves their wall
    time, since a step of a small model cannot keep both cores busy.
    """
    cmd = [sys.executable, "-m", "mlx_distill", "run", str(ctx.run_dir / "recipe.yaml")]
    cmd += ["--stage", name, "--jobs", "1", "--bar-position", str(ctx.bar_position + 1)]
    cmd += ["--force"] if force else []
    cmd += [] if ctx.progress else ["--no-progress"]
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(_half_cores()[1]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    ctx.log(f"[{name}] running beside distill (second process, pid {proc.pid})")
    return proc


def _join_side(ctx: Context, proc: subprocess.Popen, name: str, fp: str) -> str:
    """Wait for a side process; its stage must have finished with the expected fingerprint."""
    code = proc.wait()
    info = read_stage(ctx, name) or {}
    if code != 0 or info.get("status") != "done" or info.get("fingerprint") != fp:
        message = f"stage {name} failed in its side process (exit code {code}; error above)"
        raise (BadInput if code == 2 else RuntimeError)(message)
    return "ran"  # the side process logged its own "done" line
