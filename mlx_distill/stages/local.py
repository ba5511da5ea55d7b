"""The stage hooks of a local teacher (`teacher.kind: local`, `teachers.local.LocalTeacher`):
the teacher stage checks the given model folder or trains the recipe's teacher through the
trainer, then (`teacher.answers: generate`) stores its own answers to the training prompts; the
cache stage scores the training sequences (the data's, or the teacher's answers) into the token
cache, aligning the teacher's candidates to the student's tokens when the teacher's tokenizer is
another (`teachers/cross.py`)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from mlx_distill.cache import build_token_cache
from mlx_distill.cache.writer import merge_rank_manifests
from mlx_distill.context import Context, stage_result
from mlx_distill.errors import BadInput
from mlx_distill.files import file_digest, write_json_atomic
from mlx_distill.models import build_model, load_model, num_params, save_model
from mlx_distill.schema import fingerprint
from mlx_distill.stages import inputs
from mlx_distill.teachers import cross
from mlx_distill.teachers.local import LocalTeacher
from mlx_distill.text.tokenizer import template_hash, vocab_hash
from mlx_distill.train import distributed


class LocalKind:
    """`stages.kinds.TeacherKind` for a local mlx-lm teacher."""

    data_parallel = True  # ranks train the teacher together and score their cache shards

    @classmethod
    def fingerprint_parts(cls, recipe: Any) -> tuple[dict[str, Any], dict[str, str]]:
        section = {k: v for k, v in recipe.to_dict()["teacher"].items() if k != "gemini"}
        section.pop("allow_partial", None)  # a local teacher is never partial
        if recipe.teacher.answers == "data":
            section.pop("generation", None)  # read only when the teacher writes its answers
        files = {}
        if recipe.teacher.path or recipe.teacher.init:
            folder = Path(recipe.teacher.path or recipe.teacher.init)
            for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
                files[f.name] = file_digest(str(f))
        return section, files

    @classmethod
    def teach(cls, ctx: Context) -> dict[str, Any]:
        """Check a local teacher folder against the tokenizer, or train the recipe's teacher."""
        recipe, out = ctx.recipe, ctx.stage_dir("teacher")
        tokenizer = inputs.tokenizer(ctx)
        if recipe.teacher.path:  # checked in the preflight: a model folder with a tokenizer
            path = Path(recipe.teacher.path).resolve()
            if distributed.is_main():
                write_json_atomic(out / "teacher.json", {"kind": "local", "path": str(path)})
            return {"path": str(path), "trained": False, **cls._answers(ctx, path)}
        if recipe.teacher.init:  # continued training of an earlier teacher
            model, _, config = load_model(recipe.teacher.init)  # its tokenizer: preflight
        else:
            model, config = build_model(recipe.teacher.model, len(tokenizer.get_vocab()))
        cut: dict = {}
        examples = inputs.examples(ctx, tokenizer, limit=recipe.data.max_train, cut=cut)
        batches = inputs.loader(
            ctx, examples, recipe.data.max_seq_len, recipe.teacher.train.batch_size
        )
        validate = inputs.validator(ctx, tokenizer, cut)
        result, _ = inputs.fit(
            ctx, model, "teacher", batches, recipe.teacher.train, None, validate=validate
        )
        batches.close()
        path = out / "model"
        if distributed.is_main():  # every rank holds the same weights; rank 0 writes them
            save_model(model, config, ctx.stage_dir("tokenizer"), path)
            info = {"kind": "local", "path": str(path.resolve())}
            write_json_atomic(out / "teacher.json", info)
        return {
            "path": str(path),
            "trained": True,
            **inputs.data_summary(cut),
            "parameters": num_params(model),
            "seconds": round(result.seconds, 1),
            **cls._answers(ctx, path),
        }

    @classmethod
    def _answers(cls, ctx: Context, path: Path) -> dict[str, Any]:
        """teacher.answers: generate: the teacher's answers to the training prompts, stored in
        the teacher stage's answers/ records (resumable); their digest as "content"."""
        recipe = ctx.recipe
        if recipe.teacher.answers != "generate":
            return {}
        teacher = LocalTeacher(path)
        contexts = _contexts(ctx)
        ctx.log(f"[teacher] answering {len(contexts)} training prompts with the teacher")
        params = asdict(recipe.teacher.generation)
        summary = cross.generate_answers(
            teacher, contexts, ctx.stage_dir("teacher") / "answers", params, seed=recipe.seed
        )
        keys = summary.pop("keys")
        return {"answers": summary, "content": fingerprint(keys)}

    @classmethod
    def build_cache(cls, ctx: Context) -> dict[str, Any]:
        """Score the training sequences with the local teacher into the token cache."""
        recipe = ctx.recipe
        tokenizer = inputs.tokenizer(ctx)
        teacher = LocalTeacher(inputs.teacher_path(ctx))
        cut: dict = {}
        scorer, extra = teacher, {}
        if recipe.teacher.answers == "data" and teacher.vocab_hash == vocab_hash(tokenizer):
            examples = inputs.examples(ctx, tokenizer, limit=recipe.data.max_train, cut=cut)
        else:
            pairs = [cross.conversation(r, "data.train") for r in inputs.train_records(ctx)]
            if recipe.teacher.answers == "generate":
                keys = _answer_keys(ctx, teacher, [p[0] for p in pairs])
                pairs, cut_off = cross.stored_pairs(ctx.stage_dir("teacher") / "answers", keys)
                extra["answers_cut_off"] = cut_off
            rows, counts = cross.student_rows(
                tokenizer, pairs, max_len=recipe.data.max_seq_len + 1, what="data.train"
            )
            if not rows:
                raise BadInput("no training rows left for the student (see the warning above)")
            examples = [r.example for r in rows]
            extra["rows_left_out"] = counts
            if teacher.vocab_hash != vocab_hash(tokenizer):
                c = recipe.cache
                scorer = cross.CrossTeacher(
                    teacher, rows, tokenizer, k=c.k, temperature=c.temperature
                )
                ctx.log(
                    f"[cache] the teacher's tokenizer is not the student's: its top-{c.k} "
                    "candidates are aligned to the student's tokens by character offsets"
                )
        c = recipe.cache
        manifest = build_token_cache(
            scorer,
            examples,
            ctx.stage_dir("cache"),
            targets=c.targets,
            k=c.k,
            samples=c.samples,
            temperature=c.temperature,
            batch_size=c.batch_size,
            shard_rows=c.shard_rows,
            seed=recipe.seed,
            fingerprint=cls.cache_expect(ctx, tokenizer),
            progress=ctx.progress,
            rank=distributed.rank(),
            world=distributed.world(),
        )
        if distributed.world() > 1:  # each rank wrote its shards: rank 0 writes the manifest
            distributed.barrier()
            manifest = distributed.on_main(lambda: merge_rank_manifests(ctx.stage_dir("cache")))
        result = {
            "rows": manifest["rows"],
            "tokens": manifest["tokens"],
            **inputs.data_summary(cut),
        }
        if isinstance(scorer, cross.CrossTeacher):
            cov = scorer.coverage()
            extra["coverage"] = cov
            ctx.log(
                f"[cache] cross-tokenizer targets on {cov['covered_positions']} of "
                f"{cov['positions']} answer positions ({cov['position_fraction']:.1%}), covering "
                f"{cov['mass_fraction']:.1%} of the teacher's probability mass there"
            )
        return {**result, **extra}

    @classmethod
    def cache_expect(cls, ctx: Context, tokenizer: Any) -> dict[str, Any]:
        c = ctx.recipe.cache
        expect = {
            "vocab_hash": vocab_hash(tokenizer),
            "template_hash": template_hash(tokenizer),
            "targets": c.targets,
            "k": c.k,
            "temperature": c.temperature,
        }
        if c.targets == "sample":
            expect["samples"] = c.samples
        if ctx.recipe.teacher.answers == "generate":  # which stored answers the rows are
            expect["answers"] = stage_result(ctx, "teacher").get("content")
        return expect


def _contexts(ctx: Context) -> list[list[dict]]:
    """The conversation before each training record's last assistant turn."""
    return [cross.conversation(r, "data.train")[0] for r in inputs.train_records(ctx)]


def _answer_keys(ctx: Context, teacher: LocalTeacher, contexts: list[list[dict]]) -> list[str]:
    params = asdict(ctx.recipe.teacher.generation)
    return [cross.answer_key(teacher.version, params, c) for c in contexts]
