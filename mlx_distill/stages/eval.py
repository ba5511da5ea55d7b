"""The eval stage (and `mlx-distill eval PATH`): every model of the run on the held-out split.

Exact match when the data has a task with a checker, perplexity and top-1 agreement with the
teacher, and greedy samples for the report; the metrics themselves are `mlx_distill.evaluate`.
Without data.test it scores data.valid (exact match skipped), or with neither split counts the
parameters alone (`held_out`). Results land in eval/results.json; the stage summary leaves out
the samples and solved lists.
"""

from __future__ import annotations

from pathlib import Path

from mlx_distill.context import Context
from mlx_distill.evaluate import (
    SAMPLES,
    exact_match,
    exposure,
    generate_samples,
    perplexity,
    top1_agreement,
)
from mlx_distill.files import write_json_atomic
from mlx_distill.models import load_model, num_params
from mlx_distill.stages import inputs
from mlx_distill.tasks import get_checker
from mlx_distill.text.chat import encode_records
from mlx_distill.text.data import read_split
from mlx_distill.text.tokenizer import vocab_hash
from mlx_distill.train import distributed


def run_models(ctx: Context) -> dict[str, Path]:
    """The models this run has, by role: teacher, student (KD), baseline, student-q{bits},
    student-<tag> for each distill.compare run, and with a refinement phase the KD student and
    the baseline as they were before it (student-before-refine, baseline-before-refine)."""
    found = {}
    info = inputs.teacher_info(ctx)
    if info is not None and info.get("kind") == "local":
        found["teacher"] = Path(info["path"])
    bits = ctx.recipe.export.quantize_bits
    candidates = [("student", "student", "distill"), ("baseline", "baseline", "baseline")]
    if bits:
        candidates.append((f"student-q{bits}", f"student-q{bits}", "distill"))
    for tag, _ in ctx.recipe.distill.runs():  # distill.compare's students
        candidates.append((f"student-{tag}", f"student-{tag}", "distill"))
    if ctx.recipe.refine.steps:  # both phases: before refinement, and (above) after it
        candidates.append(("student-before-refine", "student-before-refine", "distill"))
        candidates.append(("baseline-before-refine", "baseline-before-refine", "baseline"))
    for role, folder, stage in candidates:
        if stage in ctx.recipe.stages and (ctx.run_dir / folder / "config.json").exists():
            found[role] = ctx.run_dir / folder
    return found


def held_out(recipe) -> tuple[str | None, str | None]:
    """(split, note): the split the eval stage scores, and what it leaves out without data.test
    (None: nothing left out). Without data.test it scores data.valid, exact match skipped;
    without either, it counts parameters alone."""
    if recipe.data.test is not None:
        return "test", None
    if recipe.data.valid is not None:
        return "valid", (
            "data.test not set: perplexity and agreement on data.valid, exact match skipped"
        )
    return None, "data.test and data.valid not set: parameters counted, nothing scored"


def evaluate_run(ctx: Context) -> dict:
    """Exact match (if the data has a task), perplexity and top-1 agreement with the teacher,
    on data.test (or, as `held_out` says, on less)."""
    from tqdm import tqdm

    recipe = ctx.recipe
    split, note = held_out(recipe)
    if note:
        ctx.log(f"[eval] {note}")
    path = getattr(recipe.data, split) if split else None
    records = read_split(recipe.data, split, limit=recipe.eval.num_examples) if path else []
    check = get_checker(recipe.data.task) if split == "test" else None
    # In a distributed group each rank evaluates every W-th batch; rank 0 writes the results.
    shard = distributed.world() > 1
    bs = recipe.eval.batch_size
    mine = sum(len(records[i : i + bs]) for i in distributed.shard(range(0, len(records), bs)))
    loaded = {role: load_model(path) for role, path in run_models(ctx).items()}
    vocab = {role: vocab_hash(tok) for role, (_, tok, _) in loaded.items()}

    def shared(role: str) -> bool:
        """Token-by-token comparisons with the teacher need its vocabulary (a teacher with
        another tokenizer is compared by exact match and perplexity only)."""
        return vocab[role] == vocab.get("teacher")

    results: dict[str, dict] = {}
    answers: dict[str, list] = {}  # role -> (prompt ids, greedy answer ids) per problem
    for role, (model, tokenizer, _) in loaded.items():
        row = {"parameters": num_params(model)}  # quantized: as unquantized weights
        results[role] = row
        if not records:
            continue
        examples, _ = encode_records(
            tokenizer,
            records,
            max_len=recipe.data.max_seq_len + 1,
            train_on=recipe.data.train_on,
            what=f"{path} ({role})",
        )
        row["perplexity"] = perplexity(model, examples, shard=shard)
        if check is not None and all("answer" in r for r in records):
            bar = tqdm(total=mine, desc=f"eval {role}", unit="problem", disable=not ctx.progress)
            acc, outputs = exact_match(
                model,
                tokenizer,
                records,
                check,
                max_new_tokens=recipe.eval.max_new_tokens,
                batch_size=bs,
                progress=bar,
                shard=shard,
            )
            bar.close()
            row["exact_match"] = acc
            row["solved"] = [
                i for i, ((o, _, _), r) in enumerate(zip(outputs, records)) if check(o, r["answer"])
            ]
            answers[role] = [(p, g) for _, p, g in outputs]
            if (
                role != "teacher"
                and "teacher" in answers
                and not role.startswith("student-q")
                and shared(role)
            ):
                # where it leaves the teacher's greedy answers (exposure bias), token by token
                teacher = loaded["teacher"][0]
                row["exposure"] = exposure(model, teacher, answers[role], answers["teacher"])
        # Free-text runs too: the report shows what each model writes, special tokens included.
        row["samples"] = generate_samples(
            model,
            tokenizer,
            records[:SAMPLES],
            max_new_tokens=recipe.eval.max_new_tokens,
            shard=shard,
        )
        if role != "teacher" and "teacher" in loaded and shared(role):
            teacher = loaded["teacher"][0]
            row["top1_agreement"] = top1_agreement(model, teacher, examples, shard=shard)
    summary = {"seed": recipe.seed, "num_examples": len(records), "models": results}
    summary.update(split=split, path=path, note=note)
    out = ctx.stage_dir("eval")
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "results.json", summary)
    brief = {
        role: {k: v for k, v in row.items() if k not in ("samples", "solved")}
        for role, row in results.items()
    }
    return brief


def stage_eval(ctx: Context) -> dict:
    return evaluate_run(ctx)
