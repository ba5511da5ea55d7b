"""The stage hooks of a Gemini teacher (`teacher.kind: gemini`): the teacher stage asks the
training prompts into the records store (`teachers.gemini.run_gemini_teacher`: resumable,
cost-capped); the cache stage turns the stored answers into the token cache
(`teachers.gemini_cache`). Only records for the current prompts, model and answer-changing
parameters are read (by key); other records in the store stay on disk unused."""

from __future__ import annotations

from typing import Any

from mlx_distill.cache import build_token_cache
from mlx_distill.cache.records import read_records
from mlx_distill.context import Context, stage_result
from mlx_distill.errors import BadInput, StageIncomplete
from mlx_distill.files import write_json_atomic
from mlx_distill.stages import inputs
from mlx_distill.teachers import gemini_cache
from mlx_distill.teachers.align import records_to_examples
from mlx_distill.teachers.gemini import partial_message, run_gemini_teacher, teacher_identity
from mlx_distill.teachers.gemini_cache import AlignedTeacher, report_line, target_k
from mlx_distill.text.chat import reasoning_span
from mlx_distill.text.tokenizer import template_hash, vocab_hash


def prompt_keys(ctx: Context) -> list[str]:
    """Record keys of the recipe's training prompts (unique, in data order)."""
    return gemini_cache.prompt_keys(ctx.recipe.teacher.gemini, inputs.train_records(ctx))


class GeminiKind:
    """`stages.kinds.TeacherKind` for Gemini."""

    data_parallel = False  # one client and one record store: rank 0 asks, the others wait

    @classmethod
    def fingerprint_parts(cls, recipe: Any) -> tuple[dict[str, Any], dict[str, str]]:

        # What an answer depends on, and nothing else: a changed max_cost, rate limit, timeout,
        # retry policy, endpoint, batch mode or poll interval must not re-ask paid prompts.
        return {"kind": "gemini", **teacher_identity(recipe.teacher.gemini)}, {}

    @classmethod
    def teach(cls, ctx: Context) -> dict[str, Any]:
        recipe, out = ctx.recipe, ctx.stage_dir("teacher")
        summary = run_gemini_teacher(
            recipe,
            inputs.train_records(ctx),
            out / "records",
            retry_failed=ctx.retry_failed,
            progress=ctx.progress,
        )
        info = {"kind": "gemini", "path": str(out / "records")}
        write_json_atomic(out / "teacher.json", info)
        if not summary["complete"]:
            message = partial_message(summary, recipe)
            if not recipe.teacher.allow_partial:
                raise StageIncomplete(message)
            ctx.log(f"[teacher] {message}; teacher.allow_partial is true: going on with them")
        elif summary["failed_prompts"]:
            ctx.log(
                f"[teacher] {summary['failed_prompts']} prompts failed (reasons in stage.json); "
                "`mlx-distill teach RECIPE --retry-failed` asks exactly those again"
            )
        return summary

    @classmethod
    def build_cache(cls, ctx: Context) -> dict[str, Any]:
        """Refuse a partial teach unless allowed, align, write the token cache."""
        recipe = ctx.recipe
        cfg = recipe.teacher.gemini
        tokenizer = inputs.tokenizer(ctx)
        records_dir = ctx.stage_dir("teacher") / "records"
        keys = prompt_keys(ctx)
        stored = read_records(records_dir, keys)
        answered = sum(r.get("status") == "ok" for r in stored)
        unasked = len(keys) - len(stored)
        partial = {
            "prompts": len(keys),
            "answered": answered,
            "failed": len(stored)
            - answered,  # not "failed_prompts": --retry-failed reruns the teacher
            "unasked": unasked,
            "partial": unasked > 0,
        }
        if unasked and not recipe.teacher.allow_partial:
            raise BadInput(
                f"the teacher's answers are partial ({answered} of {len(keys)} prompts answered, "
                f"{unasked} not asked): continue with `mlx-distill teach RECIPE`, or set "
                "teacher.allow_partial: true to train on them as they are"
            )
        think_open, think_close = reasoning_span(
            tokenizer, recipe.data.reasoning_open, recipe.data.reasoning_close
        )
        examples, targets, coverage = records_to_examples(
            records_dir,
            tokenizer,
            keys=keys,
            k=target_k(cfg),
            think_open=think_open,
            think_close=think_close,
        )
        if not examples:
            raise BadInput("the Gemini teacher has no usable answers yet; run `mlx-distill teach`")
        content = stage_result(ctx, "teacher").get("content")
        c = recipe.cache
        manifest = build_token_cache(
            AlignedTeacher(examples, targets, tokenizer, teacher_identity(cfg), content),
            examples,
            ctx.stage_dir("cache"),
            targets="topk",
            k=target_k(cfg),
            batch_size=c.batch_size,
            shard_rows=c.shard_rows,
            seed=recipe.seed,
            fingerprint=cls.cache_expect(ctx, tokenizer),
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

    @classmethod
    def cache_expect(cls, ctx: Context, tokenizer: Any) -> dict[str, Any]:
        return {
            "vocab_hash": vocab_hash(tokenizer),
            "template_hash": template_hash(tokenizer),
            "targets": "topk",
            "k": target_k(ctx.recipe.teacher.gemini),
            # which stored answers the cache was made from
            "records": stage_result(ctx, "teacher").get("content"),
        }
