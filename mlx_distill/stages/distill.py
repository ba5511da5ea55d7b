"""The distill and baseline stages: the KD student (and each `distill.compare` run) and the
plain fine-tuned baseline, trained by one loop (`inputs.fit`) from the same initial weights and
data order, then exported in mlx-lm format (adapters fused; optionally a quantized copy)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mlx_distill.cache import open_cache
from mlx_distill.context import Context
from mlx_distill.errors import BadInput
from mlx_distill.files import write_json_atomic, write_text_atomic
from mlx_distill.models import (
    FLOAT_BYTES,
    build_model,
    export_quantized,
    floating_dtype,
    from_teacher_layers,
    load_model,
    num_params,
    save_model,
)
from mlx_distill.models.adapters import apply_adapters, fuse_adapters, num_trainable, save_adapters
from mlx_distill.stages import inputs
from mlx_distill.stages.kinds import teacher_kind
from mlx_distill.teachers.local import LocalTeacher
from mlx_distill.text.tokenizer import prompt_text
from mlx_distill.train import distributed
from mlx_distill.train.onpolicy import LOSS_TAG, OnPolicySource, check_templates, onpolicy_loss


def student(ctx: Context, tokenizer):
    """(model, config) the student starts from: built, pretrained or the teacher's layers."""
    import mlx.core as mx

    s = ctx.recipe.student
    # Seeded here so the KD student and the baseline start from the same weights, in any
    # process and in any order.
    mx.random.seed(ctx.recipe.seed)
    if s.init == "pretrained":
        model, _, config = load_model(s.path)
        return model, config
    if s.init == "teacher_layers":
        teacher, _, config = load_model(inputs.teacher_path(ctx))
        return from_teacher_layers(teacher, config, s.layer_stride, layers=s.layers)
    return build_model(s.model, len(tokenizer.get_vocab()))


def student_tokenizer_dir(ctx: Context) -> Path:
    """The tokenizer the student's weights were trained with: the one its export carries."""
    s = ctx.recipe.student
    if s.init == "pretrained":
        return Path(s.path)
    if s.init == "teacher_layers":
        return inputs.teacher_path(ctx)
    return ctx.stage_dir("tokenizer")


def out_dir(ctx: Context, run: str) -> Path:
    """The exported model of a training run: student, baseline, or student-<tag> for the
    distill.compare run named distill-<tag>."""
    if run == "baseline":
        return ctx.run_dir / "baseline"
    return ctx.run_dir / ("student" + run.removeprefix("distill"))


def adapters_dir(ctx: Context, run: str) -> Path:
    """Where a LoRA/DoRA run writes its mlx-lm adapter folder."""
    return out_dir(ctx, run).with_name(out_dir(ctx, run).name + "-adapters")


def compare_recipe(recipe, entry):
    """The recipe of one distill.compare run: its mode, steps, lmbda and offline_steps, all else
    the same."""
    distill = recipe.distill.for_entry(entry)
    train = dataclasses.replace(recipe.train, steps=entry.steps or recipe.train.steps)
    return dataclasses.replace(recipe, distill=distill, train=train)


def onpolicy_source(ctx: Context, recipe, model, tokenizer, cache=None):
    """The batch source for distill.mode on_policy or mixed, and its losses.

    Loads the local teacher, checks that its tokenizer and chat template are the student's, and
    encodes the training prompts (data.train, first data.max_train) in the chat template.
    cache: the cache `Loader` (mixed mode). Returns (source, extra_losses) for the trainer.
    """
    import numpy as np

    teacher = LocalTeacher(inputs.teacher_path(ctx))
    check_templates(tokenizer, teacher.tokenizer, teacher.id)
    records = inputs.train_records(ctx)
    prompts = [
        np.array(
            tokenizer.encode(prompt_text(tokenizer, r["prompt"]), add_special_tokens=False),
            np.int32,
        )
        for r in records
    ]
    source = OnPolicySource(
        model,
        teacher,
        prompts,
        recipe.distill,
        batch_size=recipe.train.batch_size,
        seq_len=recipe.data.max_seq_len,
        temperature=recipe.loss.temperature,
        eos_ids=sorted(tokenizer.eos_token_ids),
        vocab_size=max(tokenizer.get_vocab().values()) + 1,
        seed=recipe.seed,
        cache=cache,
    )
    return source, {LOSS_TAG: onpolicy_loss(recipe.distill, recipe.loss)}


def train_student(ctx: Context, run: str, use_cache: bool, recipe=None) -> dict:
    """Train and export one student, then (for the KD student and the baseline, when
    refine.steps > 0) its refinement phase. recipe: a distill.compare run's (`compare_recipe`),
    whose `run` is distill-<tag>; else the context's."""
    recipe = recipe or ctx.recipe
    tokenizer = inputs.tokenizer(ctx)
    model, config = student(ctx, tokenizer)
    dtype = export_dtype(recipe, floating_dtype(model))  # before training casts it
    if config["vocab_size"] < len(tokenizer.get_vocab()):
        raise BadInput(
            f"student vocab_size {config['vocab_size']} is smaller than the tokenizer's "
            f"{len(tokenizer.get_vocab())}"
        )
    mode = recipe.distill.mode if use_cache else "offline"
    refine = recipe.refine.steps > 0 and run in ("distill", "baseline")
    cut: dict = {}
    needs_cache = recipe.distill.reads_cache() or (refine and recipe.refine.mode != "on_policy")
    if use_cache and needs_cache:
        expect = teacher_kind(recipe.teacher.kind).cache_expect(ctx, tokenizer)
        source = open_cache(ctx.stage_dir("cache"), expect=expect)
    elif use_cache:
        source = None  # every batch is sampled from the student: no cache
    else:
        source = inputs.examples(ctx, tokenizer, limit=recipe.data.max_train, cut=cut)
    if recipe.student.train != "full":
        # mlx_lm.load(base, adapter_path=...) needs the base: the pretrained folder, or the
        # initial weights saved inside the adapter folder.
        if recipe.student.init != "pretrained" and distributed.is_main():
            save_model(model, config, student_tokenizer_dir(ctx), adapters_dir(ctx, run) / "base")
        apply_adapters(model, recipe.student)
    loader = None
    if source is not None:
        loader = inputs.loader(ctx, source, recipe.data.max_seq_len, recipe.train.batch_size)
    batches, extra_losses = loader, None
    if mode != "offline":
        cache = loader if recipe.distill.reads_cache() else None
        batches, extra_losses = onpolicy_source(ctx, recipe, model, tokenizer, cache)
    validate = inputs.validator(ctx, tokenizer, cut)
    loss_cfg = recipe.loss if use_cache else None
    result, optimizer = inputs.fit(
        ctx,
        model,
        run,
        batches,
        recipe.train,
        loss_cfg,
        validate=validate,
        extra_losses=extra_losses,
    )
    refined = None
    if refine:
        export_before(ctx, run, recipe, model, config, dtype)
        refined = refine_phase(ctx, run, recipe, model, tokenizer, loader, optimizer, validate)
    if batches is not None:
        batches.close()
    if loader is not None and loader is not batches:
        loader.close()
    adapter_info = export(ctx, run, recipe, model, config, dtype)  # fuses: count after it
    summary = {
        "parameters": num_params(model),
        **adapter_info,
        "seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "resumed_from": result.resumed_from,
        **group_summary(result),
        "path": str(out_dir(ctx, run)),
        "dtype": dtype,
        **inputs.data_summary(cut),
    }
    if mode != "offline":  # the time split of this process's on-policy work
        summary.update(onpolicy_summary(batches))
    if refined is not None:
        summary["refine"] = refined
    return summary


def onpolicy_summary(source) -> dict:
    """The time split of a batch source's on-policy work (this process's)."""
    stats = source.stats()
    return {
        "generation_s": round(stats["gen_s"], 1),
        "scoring_s": round(stats["score_s"], 1),
        "on_policy_batches": int(stats["on_policy_batches"]),
    }


def refine_recipe(recipe):
    """The recipe the refinement phase trains with: refine.steps at refine.lr (constant after
    refine.warmup), its batches' mode, samples, lmbda and temperature (sampling and the
    on-policy loss; cached batches keep the cache's temperature, which `loss` reads them at)."""
    r = recipe.refine
    train = dataclasses.replace(
        recipe.train, steps=r.steps, lr=r.lr_for(recipe.train), warmup=r.warmup, schedule="constant"
    )
    distill = dataclasses.replace(
        recipe.distill,
        mode=r.mode,
        lmbda=r.lmbda,
        offline_steps=0,
        samples_per_prompt=r.samples_per_prompt,
        temperature=r.temperature,
        compare=[],
    )
    loss = dataclasses.replace(recipe.loss, temperature=r.temperature)
    return dataclasses.replace(recipe, train=train, distill=distill, loss=loss)


def refine_phase(ctx, run, recipe, model, tokenizer, loader, optimizer, validate) -> dict:
    """Run `run`'s refinement phase (as run <run>-refine) on the trained `model`: the KD
    student's batches as refine.mode says, the baseline's the next rows of its own data (hard
    labels), both refine.steps steps of train.batch_size rows. optimizer: the main phase's
    (optimizer, master), carried over when refine.optimizer is carry, else replaced by a fresh
    AdamW. Returns the phase's summary."""
    from mlx_distill.train.trainer import adamw, carry_optimizer

    sub = refine_recipe(recipe)
    r = recipe.refine
    opt, master = optimizer
    if r.optimizer == "carry":
        opt = carry_optimizer(opt, sub.train, offset=recipe.train.steps)
    else:
        opt = adamw(sub.train)
        opt.init(master["params"] if master else model.trainable_parameters())
    kd = run != "baseline"
    batches, extra_losses = loader, None
    if kd and r.mode != "offline":
        batches, extra_losses = onpolicy_source(
            ctx, sub, model, tokenizer, loader if r.mode == "mixed" else None
        )
    result, _ = inputs.fit(
        ctx,
        model,
        f"{run}-refine",
        batches,
        sub.train,
        recipe.loss if kd else None,
        validate=validate,
        extra_losses=extra_losses,
        optimizer=(opt, master),
    )
    info = {
        "steps": r.steps,
        "mode": r.mode if kd else "hard labels",
        "lr": sub.train.lr,
        "optimizer": r.optimizer,
        "seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "resumed_from": result.resumed_from,
        "before": str(before_dir(ctx, run)),
    }
    if kd and r.mode != "offline":
        info.update(onpolicy_summary(batches))
    return info


def before_dir(ctx: Context, run: str) -> Path:
    """Where run `run` (distill or baseline) is exported as it was before refinement."""
    return out_dir(ctx, run).with_name(out_dir(ctx, run).name + "-before-refine")


def export_before(ctx: Context, run: str, recipe, model, config, dtype: str) -> None:
    """Save the trained model as it is before the refinement phase (rank 0; adapters fused
    into a copy, so training goes on with them)."""
    import copy

    if not distributed.is_main():
        return
    if recipe.student.train != "full":
        model = copy.deepcopy(model)
        fuse_adapters(model)
    save_model(model, config, student_tokenizer_dir(ctx), before_dir(ctx, run), dtype)


def export_dtype(recipe, start: str) -> str:
    """The dtype run's models are saved in: export.dtype, else the one trained in
    (train.dtype), or the student's initial weights' (`start`) when those are narrower: a bf16
    checkpoint trained under the default float32 is exported as bf16, as it came."""
    if recipe.export.dtype is not None:
        return recipe.export.dtype
    trained = recipe.train.dtype
    return start if FLOAT_BYTES.get(start, 4) < FLOAT_BYTES[trained] else trained


def export(ctx: Context, run: str, recipe, model, config, dtype: str) -> dict:
    """Save run `run`'s trained model in mlx-lm format (rank 0), its weights in `dtype`: its
    adapters first when it trained some, then the model with them fused, and the quantized
    copy of the KD student. Returns the summary's adapter entries ({} for full training)."""
    main = distributed.is_main()  # in a distributed group rank 0 alone writes the models
    out = out_dir(ctx, run)
    stage_json = None
    if run == "baseline" and main:  # save_model replaces the folder that holds it
        stage_json = (ctx.stage_dir(run) / "stage.json").read_text()
    adapter_info = {}
    if recipe.student.train != "full":
        adapters = adapters_dir(ctx, run)
        adapter_info = {"adapters": str(adapters), "trainable": num_trainable(model)}
        base = recipe.student.path if recipe.student.init == "pretrained" else adapters / "base"
        if main:
            save_adapters(model, recipe.student, adapters, Path(base).resolve())
        fuse_adapters(model)  # the exported student loads alone, as after mlx_lm.fuse
    bits = recipe.export.quantize_bits
    if main:
        save_model(model, config, student_tokenizer_dir(ctx), out, dtype)
        if run == "distill" and bits:
            export_quantized(out, ctx.run_dir / f"student-q{bits}", bits)
        if stage_json is not None:  # the baseline's model folder is also its stage folder
            write_text_atomic(out / "stage.json", stage_json)
    return adapter_info


def group_summary(result) -> dict:
    """In a distributed group: its size and the measured all-reduce time of one step."""
    if distributed.world() == 1:
        return {}
    return {"ranks": distributed.world(), "allreduce_ms": round(result.allreduce_s * 1e3, 2)}


def stage_distill(ctx: Context) -> dict:
    """The KD student, then each distill.compare run from the same initial weights and data
    order (`student` and the loaders are seeded by the recipe seed alone)."""
    recipe = ctx.recipe
    if not recipe.distill.compare:
        return train_student(ctx, "distill", use_cache=True)
    summary = _finished(ctx, "distill")
    if summary is None:
        summary = _keep(ctx, "distill", train_student(ctx, "distill", use_cache=True))
    compare = []
    for tag, entry in recipe.distill.runs():
        run = f"distill-{tag}"
        done = _finished(ctx, run)
        if done is None:
            sub = compare_recipe(recipe, entry)
            info = {"run": run, "mode": entry.mode, "steps": sub.train.steps}
            if entry.mode == "mixed":
                info["lmbda"] = sub.distill.lmbda
            if sub.distill.offline_steps:
                info["offline_steps"] = sub.distill.offline_steps
            done = _keep(ctx, run, {**info, **train_student(ctx, run, True, sub)})
        compare.append(done)
    return {**summary, "compare": compare}


def stage_baseline(ctx: Context) -> dict:
    return train_student(ctx, "baseline", use_cache=False)


def _summary_path(ctx: Context, run: str) -> Path:
    return ctx.run_dir / "checkpoints" / run / "summary.json"


def _keep(ctx: Context, run: str, summary: dict) -> dict:
    """Record a finished, exported run of a distill stage with compare runs: a stage resumed
    after a kill skips it, and its measured wall time stays in the summary."""
    if distributed.is_main():
        path = _summary_path(ctx, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"fingerprint": ctx.fingerprint, "summary": summary})
    return summary


def _finished(ctx: Context, run: str) -> dict | None:
    """The summary `_keep` wrote for `run` under this stage fingerprint, or None."""
    path = _summary_path(ctx, run)
    exported = (out_dir(ctx, run) / "config.json").exists()
    text = path.read_text() if distributed.is_main() and path.exists() and exported else None
    text = distributed.broadcast(text) if distributed.world() > 1 else text
    if text is None:
        return None
    info = json.loads(text)
    return info["summary"] if info.get("fingerprint") == ctx.fingerprint else None
