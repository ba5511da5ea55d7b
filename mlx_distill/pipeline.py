"""The recipe's stages: tokenizer -> teacher -> cache -> distill / baseline -> eval -> report.

Each function takes the stage `Context`, writes its outputs under the run directory and returns
a small JSON-able summary that lands in its `stage.json`. Heavy imports stay inside functions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlx_distill.context import Context
from mlx_distill.errors import BadInput
from mlx_distill.text.tokenizer import TOKENIZER_FILES


def _tokenizer(ctx: Context):
    from mlx_distill.text.tokenizer import load_tokenizer

    return load_tokenizer(ctx.stage_dir("tokenizer"))


def _examples(
    ctx: Context, tokenizer, split: str = "train", limit: int | None = None, cut: dict | None = None
):
    """The split's records through the chat encoder; rows cut at data.max_seq_len are counted
    (into `cut[split]`) and reported in one line."""
    from mlx_distill.text.chat import encode_records
    from mlx_distill.text.data import read_jsonl

    data = ctx.recipe.data
    path = getattr(data, split)
    examples, n_cut = encode_records(
        tokenizer,
        read_jsonl(path, limit=limit),
        max_len=data.max_seq_len + 1,
        train_on=data.train_on,
        what=str(path),
    )
    if cut is not None:
        cut[split] = n_cut
    return examples


def _cut_summary(cut: dict) -> dict:
    """Stage-summary entries for rows cut at data.max_seq_len: rows_cut (train), valid_rows_cut."""
    return {
        ("rows_cut" if split == "train" else f"{split}_rows_cut"): n for split, n in cut.items()
    }


def _validator(ctx: Context, tokenizer, cut: dict | None = None):
    """`validate(model) -> mean CE` on data.valid for the trainer, or None without data.valid."""
    if ctx.recipe.data.valid is None:
        return None
    import math

    from mlx_distill.evaluate import perplexity

    examples = _examples(ctx, tokenizer, split="valid", cut=cut)
    return lambda model: math.log(perplexity(model, examples, ctx.recipe.eval.batch_size))


def _teacher_path(ctx: Context) -> Path:
    info = json.loads((ctx.stage_dir("teacher") / "teacher.json").read_text())
    return Path(info["path"])


def _loader(ctx: Context, source, seq_len: int, batch_size: int):
    """Batches of `batch_size` rows; in a distributed group, this rank's rows of each."""
    from mlx_distill.cache.loader import Loader
    from mlx_distill.train import distributed

    return Loader(
        source,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=ctx.recipe.seed,
        rank=distributed.rank(),
        world=distributed.world(),
    )


# -- stages ---------------------------------------------------------------------------------


def stage_tokenizer(ctx: Context) -> dict:
    """Copy the recipe's tokenizer, or train a SentencePiece model on the training split."""
    from mlx_distill.text.data import read_jsonl
    from mlx_distill.text.tokenizer import load_tokenizer, train_sentencepiece, vocab_hash

    cfg, out = ctx.recipe.tokenizer, ctx.stage_dir("tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.path:
        source = Path(cfg.path)
        load_tokenizer(source)  # fail early, with the path, if it is not a tokenizer
        for name in TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copy2(source / name, out / name)
    else:
        records = read_jsonl(ctx.recipe.data.train, limit=ctx.recipe.data.max_train)
        texts = [r["prompt"] + "\n" + r["completion"] for r in records]
        train_sentencepiece(texts, out, vocab_size=cfg.vocab_size, model_type=cfg.model_type)
    tokenizer = load_tokenizer(out)
    return {"vocab_size": len(tokenizer.get_vocab()), "vocab_hash": vocab_hash(tokenizer)}


def stage_teacher(ctx: Context) -> dict:
    """The teacher stage of the recipe's teacher kind (`teachers.base.TeacherKind.teach`)."""
    from mlx_distill.teachers import teacher_kind

    ctx.stage_dir("teacher").mkdir(parents=True, exist_ok=True)
    return teacher_kind(ctx.recipe.teacher.kind).teach(ctx)


def stage_cache(ctx: Context) -> dict:
    """The teacher's token targets for the student (`TeacherKind.build_cache`)."""
    from mlx_distill.teachers import teacher_kind

    return teacher_kind(ctx.recipe.teacher.kind).build_cache(ctx)


def _student(ctx: Context, tokenizer):
    import mlx.core as mx

    from mlx_distill.models import build_model, from_teacher_layers, load_model

    s = ctx.recipe.student
    # Seeded here so the KD student and the baseline start from the same weights, in any
    # process and in any order.
    mx.random.seed(ctx.recipe.seed)
    if s.init == "pretrained":
        model, _, config = load_model(s.path)
        return model, config
    if s.init == "teacher_layers":
        teacher, _, config = load_model(_teacher_path(ctx))
        return from_teacher_layers(teacher, config, s.layer_stride, layers=s.layers)
    return build_model(s.model, len(tokenizer.get_vocab()))


def _student_tokenizer_dir(ctx: Context) -> Path:
    """The tokenizer the student's weights were trained with: the one its export carries."""
    s = ctx.recipe.student
    if s.init == "pretrained":
        return Path(s.path)
    if s.init == "teacher_layers":
        return _teacher_path(ctx)
    return ctx.stage_dir("tokenizer")


def _out_dir(ctx: Context, run: str) -> Path:
    """The exported model of a training run: student, baseline, or student-<tag> for the
    distill.compare run named distill-<tag>."""
    if run == "baseline":
        return ctx.run_dir / "baseline"
    return ctx.run_dir / ("student" + run.removeprefix("distill"))


def _adapters_dir(ctx: Context, run: str) -> Path:
    """Where a LoRA/DoRA run writes its mlx-lm adapter folder."""
    return _out_dir(ctx, run).with_name(_out_dir(ctx, run).name + "-adapters")


def _compare_recipe(recipe, entry):
    """The recipe of one distill.compare run: its mode, steps, lmbda and offline_steps, all else
    the same."""
    import dataclasses

    distill = recipe.distill.for_entry(entry)
    train = dataclasses.replace(recipe.train, steps=entry.steps or recipe.train.steps)
    return dataclasses.replace(recipe, distill=distill, train=train)


def _train_student(ctx: Context, run: str, use_cache: bool, recipe=None) -> dict:
    """Train and export one student. recipe: a distill.compare run's (`_compare_recipe`), whose
    `run` is distill-<tag>; else the context's."""
    from mlx_distill.cache import open_cache
    from mlx_distill.models import num_params, save_model
    from mlx_distill.train import distributed
    from mlx_distill.train.trainer import train

    recipe = recipe or ctx.recipe
    stage = "distill" if use_cache else "baseline"
    main = distributed.is_main()  # in a distributed group rank 0 alone writes the models
    tokenizer = _tokenizer(ctx)
    model, config = _student(ctx, tokenizer)
    if config["vocab_size"] < len(tokenizer.get_vocab()):
        raise BadInput(
            f"student vocab_size {config['vocab_size']} is smaller than the tokenizer's "
            f"{len(tokenizer.get_vocab())}"
        )
    mode = recipe.distill.mode if use_cache else "offline"
    cut: dict = {}
    if not recipe.distill.reads_cache() and use_cache:
        source = None  # every batch is sampled from the student: no cache
    elif use_cache:
        from mlx_distill.teachers import teacher_kind

        expect = teacher_kind(recipe.teacher.kind).cache_expect(ctx, tokenizer)
        source = open_cache(ctx.stage_dir("cache"), expect=expect)
    else:
        source = _examples(ctx, tokenizer, limit=recipe.data.max_train, cut=cut)
    adapters = _adapters_dir(ctx, run)
    if recipe.student.train != "full":
        from mlx_distill.models.adapters import apply_adapters

        # mlx_lm.load(base, adapter_path=...) needs the base: the pretrained folder, or the
        # initial weights saved inside the adapter folder.
        if recipe.student.init != "pretrained" and main:
            save_model(model, config, _student_tokenizer_dir(ctx), adapters / "base")
        apply_adapters(model, recipe.student)
    loader = None
    if source is not None:
        loader = _loader(ctx, source, recipe.data.max_seq_len, recipe.train.batch_size)
    extra_losses = None
    if mode != "offline":
        from mlx_distill.train.onpolicy import build_source

        loader, extra_losses = build_source(recipe, model, tokenizer, _teacher_path(ctx), loader)
    result = train(
        model,
        loader,
        recipe.train,
        recipe.loss if use_cache else None,
        run=run,
        metrics_path=ctx.run_dir / "metrics.jsonl",
        ckpt_dir=ctx.run_dir / "checkpoints" / run,
        fingerprint=_stage_fingerprint(ctx, stage),
        seed=recipe.seed,
        progress=ctx.progress,
        bar_position=ctx.bar_position,
        validate=_validator(ctx, tokenizer, cut),
        extra_losses=extra_losses,
    )
    loader.close()
    out = _out_dir(ctx, run)
    stage_json = None
    if run == "baseline" and main:  # save_model replaces the folder that holds it
        stage_json = (ctx.stage_dir(run) / "stage.json").read_text()
    adapter_info = {}
    if recipe.student.train != "full":
        from mlx_distill.models.adapters import fuse_adapters, num_trainable, save_adapters

        adapter_info = {"adapters": str(adapters), "trainable": num_trainable(model)}
        base = recipe.student.path if recipe.student.init == "pretrained" else adapters / "base"
        if main:
            save_adapters(model, recipe.student, adapters, Path(base).resolve())
        fuse_adapters(model)  # the exported student loads alone, as after mlx_lm.fuse
    bits = recipe.export.quantize_bits
    if main:
        save_model(model, config, _student_tokenizer_dir(ctx), out)
        if run == "distill" and bits:
            from mlx_distill.models import export_quantized

            export_quantized(out, ctx.run_dir / f"student-q{bits}", bits)
        if stage_json is not None:  # the baseline's model folder is also its stage folder
            (out / "stage.json").write_text(stage_json)
    summary = {
        "parameters": num_params(model),
        **adapter_info,
        "seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "resumed_from": result.resumed_from,
        **_group_summary(result),
        "path": str(out),
        **_cut_summary(cut),
    }
    if mode != "offline":  # the time split of this process's on-policy work
        stats = loader.stats()
        summary["generation_s"] = round(stats["gen_s"], 1)
        summary["scoring_s"] = round(stats["score_s"], 1)
        summary["on_policy_batches"] = int(stats["on_policy_batches"])
    return summary


def _group_summary(result) -> dict:
    """In a distributed group: its size and the measured all-reduce time of one step."""
    from mlx_distill.train import distributed

    if distributed.world() == 1:
        return {}
    return {"ranks": distributed.world(), "allreduce_ms": round(result.allreduce_s * 1e3, 2)}


def stage_distill(ctx: Context) -> dict:
    """The KD student, then each distill.compare run from the same initial weights and data
    order (`_student` and the loaders are seeded by the recipe seed alone)."""
    recipe = ctx.recipe
    if not recipe.distill.compare:
        return _train_student(ctx, "distill", use_cache=True)
    summary = _finished(ctx, "distill")
    if summary is None:
        summary = _keep(ctx, "distill", _train_student(ctx, "distill", use_cache=True))
    compare = []
    for tag, entry in recipe.distill.runs():
        run = f"distill-{tag}"
        done = _finished(ctx, run)
        if done is None:
            sub = _compare_recipe(recipe, entry)
            info = {"run": run, "mode": entry.mode, "steps": sub.train.steps}
            if entry.mode == "mixed":
                info["lmbda"] = sub.distill.lmbda
            if sub.distill.offline_steps:
                info["offline_steps"] = sub.distill.offline_steps
            done = _keep(ctx, run, {**info, **_train_student(ctx, run, True, sub)})
        compare.append(done)
    return {**summary, "compare": compare}


def _summary_path(ctx: Context, run: str) -> Path:
    return ctx.run_dir / "checkpoints" / run / "summary.json"


def _keep(ctx: Context, run: str, summary: dict) -> dict:
    """Record a finished, exported run of a distill stage with compare runs: a stage resumed
    after a kill skips it, and its measured wall time stays in the summary."""
    from mlx_distill.train import distributed

    if distributed.is_main():
        path = _summary_path(ctx, run)
        fp = _stage_fingerprint(ctx, "distill")
        tmp = path.with_suffix(".json.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"fingerprint": fp, "summary": summary}, indent=2))
        tmp.replace(path)
    return summary


def _finished(ctx: Context, run: str) -> dict | None:
    """The summary `_keep` wrote for `run` under this stage fingerprint, or None."""
    from mlx_distill.train import distributed

    path = _summary_path(ctx, run)
    exported = (_out_dir(ctx, run) / "config.json").exists()
    text = path.read_text() if distributed.is_main() and path.exists() and exported else None
    text = distributed.broadcast(text) if distributed.world() > 1 else text
    if text is None:
        return None
    info = json.loads(text)
    current = info.get("fingerprint") == _stage_fingerprint(ctx, "distill")
    return info["summary"] if current else None


def _stage_fingerprint(ctx: Context, stage: str) -> str:
    """The fingerprint the stage runner recorded for the stage now running."""
    return json.loads((ctx.stage_dir(stage) / "stage.json").read_text())["fingerprint"]


def stage_baseline(ctx: Context) -> dict:
    return _train_student(ctx, "baseline", use_cache=False)


def stage_eval(ctx: Context) -> dict:
    from mlx_distill.evaluate import evaluate_run

    return evaluate_run(ctx)


def stage_report(ctx: Context) -> dict:
    from mlx_distill.report import write_report

    return write_report(ctx)


STAGE_FUNCTIONS = {
    "tokenizer": stage_tokenizer,
    "teacher": stage_teacher,
    "cache": stage_cache,
    "distill": stage_distill,
    "baseline": stage_baseline,
    "eval": stage_eval,
    "report": stage_report,
}
