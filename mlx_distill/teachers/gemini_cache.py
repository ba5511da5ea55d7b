"""The cache stage of a Gemini teacher: stored answers -> a token cache for the student.

Each answered prompt becomes one row in the student's tokens (its chat template, the thought
summary in the reasoning span, then the answer; `teachers/align.py`), with the teacher's
log-prob candidates aligned to the student positions they predict as sparse top-k targets. The
cache has the format a local teacher's has (`cache/writer.py`), so the distill stage trains on
both the same way: CE on the teacher's text plus KD where a position has targets; positions
without targets hold the label with probability 1 (see `cache/loader.py`), and the teacher mass
outside the stored candidates goes to the loss's tail bucket.

Only records for the current prompts, model and answer-changing parameters are read (by key);
other records in the store stay on disk unused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlx_distill.cache.records import read_records, record_key
from mlx_distill.cache.sparse import RowTargets
from mlx_distill.context import Context, read_stage
from mlx_distill.errors import BadInput


def prompt_keys(ctx: Context) -> list[str]:
    """Record keys of the recipe's training prompts (unique, in data order)."""
    from mlx_distill.teachers.gemini import teacher_identity
    from mlx_distill.text.data import read_jsonl

    recipe = ctx.recipe
    identity = teacher_identity(recipe.teacher.gemini)
    model = identity["id"].split("/", 1)[1]
    prompts = read_jsonl(recipe.data.train, limit=recipe.data.max_train)
    keys = (record_key(model, identity["params"], p["prompt"]) for p in prompts)
    return list(dict.fromkeys(keys))


def target_k(ctx: Context) -> int:
    """Slots per position: the top candidates asked for, plus the chosen token when absent."""
    return ctx.recipe.teacher.gemini.logprobs + 1


def gemini_cache_expect(ctx: Context, tokenizer: Any) -> dict[str, Any]:
    from mlx_distill.text.tokenizer import template_hash, vocab_hash

    teacher = (read_stage(ctx, "teacher") or {}).get("result") or {}
    return {
        "vocab_hash": vocab_hash(tokenizer),
        "template_hash": template_hash(tokenizer),
        "targets": "topk",
        "k": target_k(ctx),
        "records": teacher.get("content"),  # which stored answers the cache was made from
    }


class _Aligned:
    """The `teacher.score` that `build_token_cache` calls, over precomputed aligned targets."""

    def __init__(self, examples, targets, tokenizer, identity: dict, content: str | None) -> None:
        from mlx_distill.text.tokenizer import vocab_hash

        self.id = identity["id"]
        self.params = identity["params"]
        self.version = f"records:{content}"
        self.vocab_hash = vocab_hash(tokenizer)
        self.vocab_size = max(tokenizer.get_vocab().values()) + 1
        self.examples, self.targets = examples, targets

    def score(self, rows, *, row_ids, **_: Any) -> list[RowTargets]:
        return [row_targets(self.examples[i].mask, self.targets[i]) for i in row_ids]


def row_targets(mask: np.ndarray, targets: tuple[np.ndarray, np.ndarray] | None) -> RowTargets:
    """Ragged targets for the P positions t with mask[t + 1] from aligned (T, k) arrays.

    Positions the alignment did not cover get no entries (counts 0)."""
    positions = np.flatnonzero(mask[1:])
    if targets is None:
        empty = np.zeros(0, dtype=np.int32)
        return RowTargets(np.zeros(len(positions), np.int32), empty, empty.astype(np.float32))
    ids, lps = targets
    live = np.isfinite(lps[positions])
    return RowTargets(
        live.sum(axis=1).astype(np.int32),
        ids[positions][live].astype(np.int32),
        lps[positions][live].astype(np.float32),
    )


def build_gemini_cache(ctx: Context) -> dict[str, Any]:
    """The cache stage: refuse a partial teach unless allowed, align, write the token cache."""
    from mlx_distill.cache import build_token_cache
    from mlx_distill.pipeline import _tokenizer
    from mlx_distill.teachers.align import records_to_examples
    from mlx_distill.teachers.gemini import teacher_identity

    recipe = ctx.recipe
    tokenizer = _tokenizer(ctx)
    records_dir = ctx.stage_dir("teacher") / "records"
    keys = prompt_keys(ctx)
    stored = read_records(records_dir, keys)
    answered = sum(r.get("status") == "ok" for r in stored)
    unasked = len(keys) - len(stored)
    partial = {
        "prompts": len(keys),
        "answered": answered,
        "failed": len(stored) - answered,  # not "failed_prompts": --retry-failed reruns the teacher
        "unasked": unasked,
        "partial": unasked > 0,
    }
    if unasked and not recipe.teacher.allow_partial:
        raise BadInput(
            f"the teacher's answers are partial ({answered} of {len(keys)} prompts answered, "
            f"{unasked} not asked): continue with `mlx-distill teach RECIPE`, or set "
            "teacher.allow_partial: true to train on them as they are"
        )
    from mlx_distill.text.chat import reasoning_span

    think_open, think_close = reasoning_span(
        tokenizer, recipe.data.reasoning_open, recipe.data.reasoning_close
    )
    examples, targets, coverage = records_to_examples(
        records_dir,
        tokenizer,
        keys=keys,
        k=target_k(ctx),
        think_open=think_open,
        think_close=think_close,
    )
    if not examples:
        raise BadInput("the Gemini teacher has no usable answers yet; run `mlx-distill teach`")
    content = ((read_stage(ctx, "teacher") or {}).get("result") or {}).get("content")
    c = recipe.cache
    manifest = build_token_cache(
        _Aligned(examples, targets, tokenizer, teacher_identity(recipe.teacher.gemini), content),
        examples,
        ctx.stage_dir("cache"),
        targets="topk",
        k=target_k(ctx),
        batch_size=c.batch_size,
        shard_rows=c.shard_rows,
        seed=recipe.seed,
        fingerprint=gemini_cache_expect(ctx, tokenizer),
        progress=ctx.progress,
    )
    result = {
        "rows": manifest["rows"],
        "tokens": manifest["tokens"],
        "examples": len(examples),
        "prompts_used": len(examples),
        **partial,
        "coverage": coverage,
    }
    result["report"] = report_line(result)
    return result


def report_line(result: dict[str, Any]) -> str:
    """The report's sentence on what the student learned from (prompts used, coverage)."""
    cov = result["coverage"]
    line = (
        f"Teacher data: {result['prompts_used']} of {result['prompts']} prompts used "
        f"({result['answered']} answered, {result['failed']} failed, "
        f"{result['unasked']} not asked"
        + ("; a partial teach, allowed by teacher.allow_partial" if result["partial"] else "")
        + f"; {cov['skipped']} answers left out as failed or cut off)."
    )
    if cov["with_logprobs"]:
        ids = "exact teacher ids" if cov["exact_ids"] else "token strings"
        line += (
            f" Token-level targets ({ids}) on {cov['covered_positions']} of {cov['positions']} "
            f"answer positions ({cov['position_fraction']:.1%}), covering "
            f"{cov['mass_fraction']:.1%} of the teacher's probability mass there."
        )
    else:
        line += " No log-probs: sequence-level KD on the teacher's text only."
    return line
