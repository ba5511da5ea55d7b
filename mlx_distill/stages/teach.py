"""The first three stages: tokenizer, teacher and cache (`mlx-distill teach`).

The teacher and cache stages are the recipe's teacher kind's (`kinds.teacher_kind`): a local
mlx-lm model (`local.py`) or Gemini (`gemini.py`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mlx_distill.context import Context
from mlx_distill.stages import inputs
from mlx_distill.stages.kinds import teacher_kind
from mlx_distill.text.tokenizer import (
    TOKENIZER_FILES,
    load_tokenizer,
    train_sentencepiece,
    vocab_hash,
)


def stage_tokenizer(ctx: Context) -> dict:
    """Copy the recipe's tokenizer, or train a SentencePiece model on the training split."""
    cfg, out = ctx.recipe.tokenizer, ctx.stage_dir("tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.path:
        source = Path(cfg.path)
        load_tokenizer(source)  # fail early, with the path, if it is not a tokenizer
        for name in TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copy2(source / name, out / name)
    else:
        records = inputs.train_records(ctx)
        texts = [r["prompt"] + "\n" + r["completion"] for r in records]
        train_sentencepiece(texts, out, vocab_size=cfg.vocab_size, model_type=cfg.model_type)
    tokenizer = load_tokenizer(out)
    return {"vocab_size": len(tokenizer.get_vocab()), "vocab_hash": vocab_hash(tokenizer)}


def stage_teacher(ctx: Context) -> dict:
    """The teacher stage of the recipe's teacher kind (`TeacherKind.teach`)."""
    ctx.stage_dir("teacher").mkdir(parents=True, exist_ok=True)
    return teacher_kind(ctx.recipe.teacher.kind).teach(ctx)


def stage_cache(ctx: Context) -> dict:
    """The teacher's token targets for the student (`TeacherKind.build_cache`)."""
    return teacher_kind(ctx.recipe.teacher.kind).build_cache(ctx)
