"""What the stage bodies build from a run context: the run's tokenizer, the encoded splits, the
teacher the teacher stage chose, batch sources, the validator, and one training run.

Everything here reads the context and hands plain objects (models, examples, loaders) to the
libraries below.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlx_distill.cache.loader import Loader
from mlx_distill.context import Context
from mlx_distill.errors import BadInput
from mlx_distill.evaluate import perplexity
from mlx_distill.text.chat import encode_records
from mlx_distill.text.data import read_split
from mlx_distill.text.tokenizer import load_tokenizer
from mlx_distill.train import distributed
from mlx_distill.train.checkpoint import Checkpoints
from mlx_distill.train.log import RunLog
from mlx_distill.train.loss import make_loss
from mlx_distill.train.trainer import make_optimizer, train


def tokenizer(ctx: Context):
    """The run's tokenizer (the tokenizer stage's folder)."""
    return load_tokenizer(ctx.stage_dir("tokenizer"))


def train_records(ctx: Context) -> list[dict]:
    """The training split's records as read (the first data.max_train)."""
    return read_split(ctx.recipe.data, "train", limit=ctx.recipe.data.max_train)


def examples(
    ctx: Context, tokenizer, split: str = "train", limit: int | None = None, cut: dict | None = None
):
    """The split's records through the chat encoder (a record may give several rows, or none);
    the `text.chat.Counts` go into `cut[split]`."""
    data = ctx.recipe.data
    path = getattr(data, split)
    encoded, counts = encode_records(
        tokenizer,
        read_split(data, split, limit=limit),
        max_len=data.max_seq_len + 1,
        train_on=data.train_on,
        what=str(path),
    )
    if cut is not None:
        cut[split] = counts
    return encoded


def data_summary(cut: dict) -> dict:
    """Stage-summary entries of the encoded splits: `data` (train), `valid_data`, each with
    records, rows, turns_trained, split_per_turn, rows_cut, rows_dropped."""
    return {
        ("data" if split == "train" else f"{split}_data"): counts.summary()
        for split, counts in cut.items()
    }


def validator(ctx: Context, tokenizer, cut: dict | None = None):
    """`validate(model) -> mean CE` on data.valid for the trainer, or None without data.valid."""
    if ctx.recipe.data.valid is None:
        return None

    valid = examples(ctx, tokenizer, split="valid", cut=cut)
    return lambda model: math.log(perplexity(model, valid, ctx.recipe.eval.batch_size))


def teacher_info(ctx: Context) -> dict | None:
    """What the teacher stage recorded in teacher.json ({"kind", "path"}), or None."""
    path = ctx.stage_dir("teacher") / "teacher.json"
    return json.loads(path.read_text()) if path.exists() else None


def teacher_path(ctx: Context) -> Path:
    """The local teacher's model folder (given, or trained by the teacher stage)."""
    info = teacher_info(ctx)
    if info is None:
        raise BadInput(
            f"{ctx.stage_dir('teacher') / 'teacher.json'} not found: the teacher stage has not "
            "run in this run directory (keep `teacher` in the recipe's stages)"
        )
    return Path(info["path"])


def loader(ctx: Context, source, seq_len: int, batch_size: int):
    """Batches of `batch_size` rows; in a distributed group, this rank's rows of each."""
    return Loader(
        source,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=ctx.recipe.seed,
        rank=distributed.rank(),
        world=distributed.world(),
    )


def fit(
    ctx: Context,
    model,
    run: str,
    batches,
    train_cfg,
    loss_cfg,
    *,
    validate,
    extra_losses=None,
    optimizer=None,
):
    """Train `model` as run `run` of the running stage (teacher, distill, distill-<tag>,
    baseline, or a refinement phase <run>-refine): seeded by the recipe seed, checkpointed under
    checkpoints/<run> against the stage's fingerprint, logged to metrics.jsonl as `run` with a
    progress bar. loss_cfg None: cross-entropy on the labels. optimizer: (optimizer, master) to
    train with (a carried one, see `trainer.carry_optimizer`); None: a new one from train_cfg.
    Returns (the trainer's `TrainResult`, (optimizer, master))."""
    import mlx.core as mx

    mx.random.seed(ctx.recipe.seed)
    optimizer, master = optimizer or make_optimizer(model, train_cfg)
    log = RunLog(
        ctx.run_dir / "metrics.jsonl", run, progress=ctx.progress, bar_position=ctx.bar_position
    )
    result = train(
        model,
        optimizer,
        batches,
        make_loss(loss_cfg),
        train_cfg,
        name=run,
        master=master,
        extra_losses=extra_losses,
        checkpoints=Checkpoints(ctx.run_dir / "checkpoints" / run, ctx.fingerprint),
        validate=validate,
        callback=log,
    )
    return result, (optimizer, master)
