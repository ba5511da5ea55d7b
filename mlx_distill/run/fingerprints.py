"""Stage fingerprints, and why a stage is stale in words.

A stage's fingerprint hashes its recipe sections, the recipe seed, the content of the data files
it reads and its upstream stages' fingerprints (`table.TABLE`). A Hub cache folder in the recipe
(`hub.resolve_recipe`) is hashed as `org/name@<commit>`: the revision a run used is recorded,
and a moved cache keeps the fingerprints. `runs/<name>/<stage>/stage.json`
records the fingerprint and its inputs, so a refusal can name the fields that changed.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from mlx_distill.context import Context, read_stage, stage_result
from mlx_distill.errors import BadInput
from mlx_distill.files import file_digest
from mlx_distill.hub import folder_digest, portable
from mlx_distill.recipe import STAGES, Recipe, fingerprint
from mlx_distill.run.table import TABLE, group, upstream_of
from mlx_distill.stages.kinds import teacher_kind


def stage_inputs(
    recipe: Recipe, contents: dict[str, str] | None = None
) -> tuple[dict[str, str], dict[str, dict]]:
    """(fingerprint, inputs) of every stage, upstream first; the inputs are what is hashed.

    The teacher section is what the teacher kind says its output depends on
    (`TeacherKind.fingerprint_parts`: no cost caps, rate limits or endpoints). contents:
    {stage: digest of what it produced} for stages whose output can grow under one
    fingerprint (a teacher continued after a stop); the stages downstream hash it.
    """
    data_files = {k: _data_digest(getattr(recipe.data, k)) for k in ("train", "valid", "test")}
    teacher_section, teacher_files = teacher_kind(recipe.teacher.kind).fingerprint_parts(recipe)
    contents = contents or {}
    prints: dict[str, str] = {}
    inputs: dict[str, dict] = {}
    resolved = recipe.to_dict()
    resolved["teacher"] = teacher_section
    resolved = portable(resolved)
    if not any(_is_dir(getattr(recipe.data, k)) for k in ("train", "valid", "test")):
        del resolved["data"]["dataset"]  # read only for dataset folders
    # Keys added since: left out at their defaults, so existing runs keep their fingerprints.
    if not resolved["distill"]["compare"]:
        del resolved["distill"]["compare"]
    if not resolved["distill"]["offline_steps"]:
        del resolved["distill"]["offline_steps"]
    for entry in resolved["distill"].get("compare", []):
        if entry["offline_steps"] is None:
            del entry["offline_steps"]
    for name in STAGES:
        stage = TABLE[name]
        payload = {
            "stage": name,
            "sections": {k: resolved[k] for k in stage.sections},
            "seed": recipe.seed,
            "upstream": {u: prints[u] for u in stage.upstream},
        }
        produced = {u: contents[u] for u in stage.upstream if contents.get(u)}
        if produced:
            payload["upstream_content"] = produced
        if "data" in stage.sections:
            payload["data_files"] = data_files
        if name == "teacher":
            payload["teacher_files"] = teacher_files
        if name in ("eval", "report") and not recipe.baseline:
            payload["baseline"] = False  # what they show changes; left out at the default
        prints[name] = fingerprint(payload)
        inputs[name] = payload
    return prints, inputs


def _is_dir(path: str | None) -> bool:
    return path is not None and Path(path).is_dir()


def _data_digest(path: str | None) -> str:
    """A data file's digest, a dataset folder's (its files, or a Hub snapshot's commit)."""
    return folder_digest(path) if _is_dir(path) else file_digest(path)


def contents(ctx: Context) -> dict[str, str]:
    """{stage: result["content"]} of the stages that report one."""
    out = {}
    for name in STAGES:
        content = stage_result(ctx, name).get("content")
        if content:
            out[name] = content
    return out


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
    made = TABLE[name].made
    if previous is None:
        return f"the {name} stage has not run yet"
    if previous.get("fingerprint") == prints[name]:
        why = f": {previous['error']}" if previous.get("error") else ""
        return f"the {name} stage did not finish (status {previous.get('status')!r}{why})"
    old = previous.get("inputs")
    if not isinstance(old, dict):
        return f"the recipe or the data changed since {made}"
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
        return f"the recipe changed since {made}"
    shown = changes[:3] + ([f"{len(changes) - 3} more"] if len(changes) > 3 else [])
    listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
    return f"{listed} since {made}"


def rebuild_command(ctx: Context, stale: list[str]) -> str:
    """The command that reruns the `stale` stages with the same recipe and overrides."""
    if len(stale) > 1 and set(stale) <= set(group("teach")):
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
    needed = [s for s in upstream_of(selected, enabled) if s not in selected]
    stale = []
    for name in needed:
        info = read_stage(ctx, name) or {}
        if info.get("status") != "done" or info.get("fingerprint") != prints[name]:
            stale.append(name)
    if not stale:
        return
    readers = [s for s in selected if stale[0] in upstream_of([s], enabled)]
    what = " and ".join(readers) + (" stages read" if len(readers) > 1 else " stage reads")
    reason = why_stale(ctx, stale[0], prints, inputs)
    verb = "build" if reason.endswith("has not run yet") else "rebuild"
    also = f" (with {', '.join(stale[1:])})" if len(stale) > 1 else ""
    raise BadInput(
        f"{reason}; the {what} it, so {verb} it{also} first: {rebuild_command(ctx, stale)}"
    )
