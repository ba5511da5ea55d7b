"""The recipe's run-mode checks: distill.mode and its settings, each distill.compare entry,
refine.*, and what each mode needs of the teacher and the stages (part of the typed recipe
schema in `mlx_distill.recipe`, whose `Recipe.validate` calls `validate_modes`; the recipe
passed in is a `mlx_distill.recipe.Recipe`)."""

from __future__ import annotations

from typing import Any, Literal

from mlx_distill.errors import BadInput
from mlx_distill.schema import choices

DistillMode = Literal["offline", "on_policy", "mixed"]


def validate_modes(recipe: Any) -> None:
    """distill.*, distill.compare[*] and refine.*: the modes and what each needs."""
    d = recipe.distill
    if d.mode != "offline" and recipe.teacher.kind == "gemini":
        raise BadInput(_gemini_refusal("distill.mode", d.mode))
    if not 0.0 <= d.lmbda <= 1.0:
        raise BadInput(f"recipe key distill.lmbda: must be in [0, 1], got {d.lmbda}")
    if d.samples_per_prompt < 1 or recipe.train.batch_size % d.samples_per_prompt:
        raise BadInput(
            f"recipe key distill.samples_per_prompt: must be >= 1 and divide "
            f"train.batch_size {recipe.train.batch_size}, got {d.samples_per_prompt}"
        )
    if d.temperature < 0 or not 0.0 < d.top_p <= 1.0:
        raise BadInput("recipe keys distill.temperature >= 0 and distill.top_p in (0, 1]")
    if d.max_new_tokens < 1 or d.k < 1:
        raise BadInput("recipe keys distill.max_new_tokens and distill.k must be >= 1")
    _validate_offline_steps("distill", d.mode, d.offline_steps, recipe.train.steps)
    if "distill" in recipe.stages and d.reads_cache() and "cache" not in recipe.stages:
        key = "distill.offline_steps" if d.mode == "on_policy" else "distill.mode"
        raise BadInput(
            f"recipe key {key}: the distill stage trains on the teacher cache ({d.mode}"
            f"{f', offline_steps {d.offline_steps}' if d.offline_steps else ''}), and stages "
            "has no cache stage; add cache to stages, or use mode on_policy"
        )
    for i, entry in enumerate(d.compare):
        _validate_compare(recipe, f"distill.compare[{i}]", entry)
    _validate_refine(recipe)


def _validate_refine(recipe: Any) -> None:
    r = recipe.refine
    if r.steps < 0 or r.warmup < 0:
        raise BadInput("recipe keys refine.steps and refine.warmup: must be >= 0")
    if r.steps == 0:
        return
    if r.lr_for(recipe.train) <= 0:
        raise BadInput(f"recipe key refine.lr: must be > 0, got {r.lr}")
    if not 0.0 <= r.lmbda <= 1.0:
        raise BadInput(f"recipe key refine.lmbda: must be in [0, 1], got {r.lmbda}")
    if r.temperature <= 0:
        raise BadInput(f"recipe key refine.temperature: must be > 0, got {r.temperature}")
    if r.mode != "offline":
        if recipe.teacher.kind == "gemini":
            raise BadInput(_gemini_refusal("refine.mode", r.mode))
        if r.samples_per_prompt < 1 or recipe.train.batch_size % r.samples_per_prompt:
            raise BadInput(
                f"recipe key refine.samples_per_prompt: must be >= 1 and divide "
                f"train.batch_size {recipe.train.batch_size}, got {r.samples_per_prompt}"
            )
    if r.mode != "on_policy" and "cache" not in recipe.stages:
        raise BadInput(
            f"recipe key refine.mode: {r.mode} trains on the teacher cache, and stages has "
            "no cache stage; add cache to stages, or use mode on_policy"
        )


def _validate_compare(recipe: Any, key: str, entry: Any) -> None:
    modes = ", ".join(choices(DistillMode))
    if entry.mode not in choices(DistillMode):
        got = "required, one" if entry.mode is None else f"{entry.mode!r} is not one"
        raise BadInput(f"recipe key {key}.mode: {got} of {modes}")
    if entry.steps is not None and entry.steps <= 0:
        raise BadInput(f"recipe key {key}.steps: must be > 0, got {entry.steps}")
    if entry.lmbda is not None:
        if entry.mode != "mixed":
            raise BadInput(f"recipe key {key}.lmbda: only for mode mixed, not {entry.mode}")
        if not 0.0 <= entry.lmbda <= 1.0:
            raise BadInput(f"recipe key {key}.lmbda: must be in [0, 1], got {entry.lmbda}")
    if entry.mode != "offline" and recipe.teacher.kind == "gemini":
        raise BadInput(_gemini_refusal(f"{key}.mode", entry.mode))
    cfg = recipe.distill.for_entry(entry)
    warm = cfg.offline_steps if entry.offline_steps is None else entry.offline_steps
    _validate_offline_steps(key, entry.mode, warm, entry.steps or recipe.train.steps)
    if cfg.reads_cache() and "cache" not in recipe.stages:
        raise BadInput(
            f"recipe key {key}.mode: {entry.mode} trains on the teacher cache, and stages "
            "has no cache stage; add cache to stages, or use mode on_policy"
        )


def _validate_offline_steps(key: str, mode: str, offline_steps: int, steps: int) -> None:
    if offline_steps == 0:
        return
    if mode == "offline":
        raise BadInput(
            f"recipe key {key}.offline_steps: only for mode on_policy or mixed (an offline "
            "run reads the cache at every step)"
        )
    if not 0 < offline_steps < steps:
        raise BadInput(
            f"recipe key {key}.offline_steps: must be in [0, {steps}) (the run's steps), "
            f"got {offline_steps}"
        )


def _gemini_refusal(key: str, mode: str) -> str:
    return (
        f"recipe key {key}: {mode} needs a teacher that scores the student's own tokens, and "
        "Gemini cannot score text it did not write; use teacher.kind: local with an mlx-lm "
        f"teacher (e.g. a 4-bit Qwen2.5), or {key}: offline"
    )
