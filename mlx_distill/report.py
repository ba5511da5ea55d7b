"""The run report: the evaluation's table, the paired sign test, loss curves (markdown + PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _plot(metrics_path: Path, png: Path, runs: set[str] | None = None, offset: int = 0) -> bool:
    """Loss curves of every run in metrics.jsonl; runs: if given, the distill-* runs to show
    (lines of a distill.compare run since dropped from the recipe are left out). A refinement
    phase (<run>-refine) is drawn after its main phase: its steps shifted by `offset`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return False
    curves: dict[str, dict[str, list]] = {}
    valid: dict[str, tuple[list, list]] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if runs is not None and rec["run"].startswith("distill-") and rec["run"] not in runs:
            continue
        if rec["run"].endswith("-refine"):
            rec["step"] += offset
        if "valid_loss" in rec:  # validation records: data.valid every train.eval_every steps
            steps, losses = valid.setdefault(rec["run"], ([], []))
            steps.append(rec["step"])
            losses.append(rec["valid_loss"])
            continue
        c = curves.setdefault(rec["run"], {"loss": ([], []), "ce": ([], [])})
        for key, value in (("loss", rec["loss"]), ("ce", rec.get("ce", rec["loss"]))):
            if value is not None and math.isfinite(value):  # none logged on on-policy batches
                c[key][0].append(rec["step"])
                c[key][1].append(value)
    if not curves:
        return False
    panels = [
        (
            "training loss (KD mix for distill, CE otherwise)",
            {r: c["loss"] for r, c in curves.items()},
        ),
        ("cross-entropy on the reference answer tokens", {r: c["ce"] for r, c in curves.items()}),
    ]
    if valid:
        panels.append(("validation cross-entropy (data.valid)", valid))
    fig, axes = plt.subplots(1, len(panels), figsize=(16 if valid else 11, 4))
    for ax, (title, lines) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        drawn = {run: xy for run, xy in lines.items() if xy[0]}
        if not drawn:  # e.g. no cross-entropy logged: say so rather than draw an empty axis
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
            continue
        for run, (steps, values) in drawn.items():
            ax.plot(steps, values, marker="o" if lines is valid else None, label=run)
        if all(v > 0 for _, values in drawn.values() for v in values):  # log needs > 0
            ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven | each side 1/2), n = a + b."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def write_report(
    recipe,
    run_dir: Path,
    results: dict,
    stages: dict[str, dict],
    paths: dict[str, Path],
    records: dict[str, dict] | None = None,
) -> dict:
    """report.md + loss_curves.png in `run_dir`; the last lines say how to chat.

    results: the eval stage's results.json. stages: {stage: its summary} of the teacher,
    cache, distill and baseline stages ({} for one that did not run). paths: {role: model
    folder} of the run's models (teacher, student, baseline, ...). records: {stage: its
    stage.json} of the stages that finished (wall time, peak memory, the summary's row cuts).
    """
    models = results["models"]
    lines = [f"# {recipe.name}", "", _held_out_line(results, recipe)]
    if "baseline" not in recipe.stages:
        lines.append(
            "No baseline in this run (`--no-baseline`, `baseline: false` or a stage list "
            "without it): the KD student is not compared with the same student fine-tuned on "
            "hard labels."
        )
    lines += [
        "",
        "| model | parameters | exact match | perplexity | top-1 agreement with teacher |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    params = {}
    for stage, role in (("distill", "student"), ("baseline", "baseline"), ("teacher", "teacher")):
        params[role] = stages.get(stage, {}).get("parameters")
    names = {"teacher": "teacher", "student": "KD student", "baseline": "baseline (hard labels)"}
    if recipe.refine.steps:
        names["student"] = "KD student, refined"
        names["baseline"] = "baseline (hard labels), continued"
        names["student-before-refine"] = "KD student before refinement"
        names["baseline-before-refine"] = "baseline before its continuation"
        params["student-before-refine"] = params["student"]
        params["baseline-before-refine"] = params["baseline"]
    tags = [tag for tag, _ in recipe.distill.runs()]
    for tag in tags:
        names[f"student-{tag}"] = f"{tag} student (distill.compare)"
    for role in models:
        if role.startswith("student-q"):
            names[role] = f"KD student, {role.removeprefix('student-q')}-bit export"
    for role, row in models.items():
        em = f"{row['exact_match']:.1%}" if "exact_match" in row else "n/a"
        agree = f"{row['top1_agreement']:.1%}" if "top1_agreement" in row else "-"
        count = params.get(role) or row.get("parameters")
        p = f"{count:,}" if count else "-"
        ppl = f"{row['perplexity']:.3f}" if "perplexity" in row else "-"
        lines.append(f"| {names[role]} | {p} | {em} | {ppl} | {agree} |")
    if "student" in models and "baseline" in models and "exact_match" in models["student"]:
        diff = models["student"]["exact_match"] - models["baseline"]["exact_match"]
        verdict = {1: "beats", 0: "ties", -1: "trails"}[(diff > 0) - (diff < 0)]
        lines += [
            "",
            f"The KD student {verdict} the baseline ({diff * 100:+.1f} points of exact "
            f"match; same architecture, same {_steps(recipe)}, same data order, "
            f"seed {recipe.seed}); loss `{recipe.loss.kind}`, kd_weight {recipe.loss.kd_weight}, "
            f"temperature {recipe.loss.temperature}, cache `{recipe.cache.targets}` "
            f"k={recipe.cache.k}.",
        ]
        if "solved" in models["student"] and "solved" in models["baseline"]:
            kd, base = set(models["student"]["solved"]), set(models["baseline"]["solved"])
            only_kd, only_base = len(kd - base), len(base - kd)
            lines += [
                f"Paired on the same problems: only the KD student solves {only_kd}, only the "
                f"baseline {only_base} (two-sided sign test p = "
                f"{sign_test(only_kd, only_base):.2g}).",
            ]
    lines += _compare_section(recipe, stages, models)
    lines += _refine_section(recipe, stages, models)
    lines += _exposure_section(models, names)
    lines += _exports_section(recipe, stages, paths)
    lines += _stages_section(records or {})
    teacher_data = stages.get("cache", {}).get("report")
    if teacher_data:  # what an API teacher's cache was made from (prompts used, coverage)
        lines += ["", teacher_data]
    lines += _samples_section(models, names, recipe.eval.max_new_tokens)
    png = run_dir / "loss_curves.png"
    shown = {f"distill-{tag}" for tag in tags} | {"distill-refine"}
    if _plot(run_dir / "metrics.jsonl", png, shown, offset=recipe.train.steps):
        lines += ["", "![loss curves](loss_curves.png)"]
    chat_target = "student" if "student" in models else next(iter(paths), None)
    if chat_target is not None:
        path = paths[chat_target]
        lines += [
            "",
            "## Next",
            "",
            "Chat with the result:",
            "",
            "```",
            f"mlx-distill chat {path}",
            f'python -m mlx_lm generate --model {path} --prompt "{_sample_prompt(results)}"',
            "```",
        ]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return {"report": str(run_dir / "report.md")}


def _held_out_line(results: dict, recipe) -> str:
    """What the table was measured on: data.test, or (without it) data.valid or nothing."""
    split = results.get("split", "test")  # results.json from before the key: data.test
    path = results.get("path") or recipe.data.test
    seed, n = results["seed"], results["num_examples"]
    if split == "test":
        return f"Seed {seed}; {n} held-out examples from `{path}`."
    if split == "valid":
        return (
            f"Seed {seed}; {n} examples of the validation split `{path}`: data.test is not set, "
            "so exact match was skipped."
        )
    return f"Seed {seed}; data.test and data.valid are not set: parameters counted, nothing scored."


def _size(folder: Path) -> str:
    """The size of a model folder's weights on disk."""
    n = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def _exports_section(recipe, stages: dict[str, dict], paths: dict[str, Path]) -> list[str]:
    """Each trained model's export (folder, dtype, size) and, for LoRA/DoRA runs, where the
    adapters are and how mlx-lm loads them."""
    rows = []
    for stage, role, name in (
        ("distill", "student", "KD student"),
        ("baseline", "baseline", "baseline"),
    ):
        info = stages.get(stage, {})
        if role in paths and info:
            rows.append((name, paths[role], info))
    if not rows:
        return []
    lines = [
        "",
        "## Exports",
        "",
        "| model | folder | weights | size |",
        "| --- | --- | --- | ---: |",
    ]
    for name, folder, info in rows:
        lines.append(f"| {name} | `{folder}` | {info.get('dtype', '-')} | {_size(folder)} |")
    for role in paths:
        if role.startswith("student-q"):
            bits = role.removeprefix("student-q")
            lines.append(
                f"| KD student, {bits}-bit | `{paths[role]}` | {bits}-bit | {_size(paths[role])} |"
            )
    adapted = [(name, folder, info) for name, folder, info in rows if info.get("adapters")]
    for name, folder, info in adapted:
        adapters = Path(info["adapters"])
        base = recipe.student.path if recipe.student.init == "pretrained" else adapters / "base"
        lines += [
            "",
            f"The {name} trained {recipe.student.train} adapters ({info.get('trainable', 0):,} "
            f"trainable parameters) in `{adapters}`; with its base:",
            "",
            "```",
            f'mlx_lm.load("{base}", adapter_path="{adapters}")',
            f"python -m mlx_lm generate --model {base} --adapter-path {adapters} --prompt ...",
            "```",
            "",
            f"`{folder}` has them fused into the weights and loads alone.",
        ]
    return lines


def _stages_section(records: dict[str, dict]) -> list[str]:
    """Each finished stage's wall time and its process's peak memory, and the rows the data
    encoding cut at data.max_seq_len (whatever counts the stage's summary holds)."""
    if not records:
        return []
    lines = [
        "",
        "## Stages",
        "",
        "| stage | wall time | peak memory | rows cut at data.max_seq_len |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, info in records.items():
        wall = f"{info['seconds']:,.1f} s" if "seconds" in info else "-"
        peak = _bytes(info["peak_memory_bytes"]) if "peak_memory_bytes" in info else "-"
        lines.append(f"| {name} | {wall} | {peak} | {_cuts(info.get('result') or {})} |")
    return lines


def _bytes(n: int) -> str:
    return f"{n / 2**30:,.2f} GB" if n >= 2**30 else f"{n / 2**20:,.1f} MB"


def _cuts(summary: dict) -> str:
    """The rows a stage's data lost at data.max_seq_len: cut (shortened) and dropped (no trained
    token left), from the summary's `data` / `<split>_data` counts (`text.chat.Counts`) or a
    cross-tokenizer cache's `rows_left_out`, as "rows cut 2, rows dropped 0, valid rows cut 0";
    "-" when it has none."""
    parts = []
    for key, value in summary.items():
        if not isinstance(value, dict):
            continue
        if key == "data" or key.endswith("_data"):
            split = "" if key == "data" else key.removesuffix("_data") + " "
            cut, dropped = value.get("rows_cut", 0), value.get("rows_dropped", 0)
            parts.append(f"{split}rows cut {cut:,}, {split}rows dropped {dropped:,}")
        elif key == "rows_left_out":
            cut, dropped = value.get("shortened", 0), value.get("dropped", 0)
            parts.append(f"rows cut {cut:,}, rows dropped {dropped:,}")
    return ", ".join(parts) or "-"


def _compare_section(recipe, stages: dict[str, dict], models: dict) -> list[str]:
    """The distill modes side by side when distill.compare ran: steps, the training's wall time
    and its on-policy part (the source's generation and teacher scoring), exact match."""
    distill = stages.get("distill", {})
    if not distill.get("compare"):
        return []
    baseline = stages.get("baseline", {})

    def mode_name(mode: str, lmbda: float | None, warm: int | None = None) -> str:
        name = f"{mode} (lmbda {lmbda})" if mode == "mixed" else mode
        return f"{name} after {warm:,} offline step{'s' if warm > 1 else ''}" if warm else name

    rows = []
    if "baseline" in models:
        rows.append(("baseline (hard labels)", recipe.train.steps, baseline, "baseline"))
    main = mode_name(recipe.distill.mode, recipe.distill.lmbda, recipe.distill.offline_steps)
    rows.append((f"{main}: the KD student", recipe.train.steps, distill, "student"))
    for run in distill["compare"]:
        tag = run["run"].removeprefix("distill-")
        name = mode_name(run["mode"], run.get("lmbda"), run.get("offline_steps"))
        rows.append((f"{name}: student-{tag}", run["steps"], run, f"student-{tag}"))
    lines = [
        "",
        "## Distill modes compared",
        "",
        f"Same initial weights and data order (seed {recipe.seed}); training wall time of each "
        "run, and its on-policy part.",
        "",
        "| mode | steps | training wall time | of which generation / teacher scoring "
        "| exact match |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, steps, info, role in rows:
        wall = f"{info['seconds']:,.1f} s" if "seconds" in info else "-"
        split = "-"
        if "generation_s" in info:
            split = f"{info['generation_s']:,.1f} s / {info['scoring_s']:,.1f} s"
        row = models.get(role, {})
        em = f"{row['exact_match']:.1%}" if "exact_match" in row else "n/a"
        lines.append(f"| {name} | {steps:,} | {wall} | {split} | {em} |")
    return lines


def _steps(recipe) -> str:
    """The training budget both models had: steps, plus the refinement phase's."""
    if recipe.refine.steps:
        return f"{recipe.train.steps} + {recipe.refine.steps} steps"
    return f"{recipe.train.steps} steps"


def _paired(models: dict, a: str, b: str) -> str:
    """'only A solves x, only B y (p = ...)' for two models' solved problems."""
    if "solved" not in models.get(a, {}) or "solved" not in models.get(b, {}):
        return "-"
    sa, sb = set(models[a]["solved"]), set(models[b]["solved"])
    x, y = len(sa - sb), len(sb - sa)
    return f"{x} / {y} (p = {sign_test(x, y):.2g})"


def _refine_section(recipe, stages: dict[str, dict], models: dict) -> list[str]:
    """Both phases when refine.steps > 0: each model's exact match before and after its
    refinement (the KD student's refine.mode phase, the baseline's matched continuation on
    hard labels), the phases' wall times and the paired comparisons."""
    if not recipe.refine.steps:
        return []
    r = recipe.refine
    lines = [
        "",
        "## Refinement",
        "",
        f"After the main phase ({recipe.train.steps:,} steps) the KD student trained "
        f"{r.steps:,} more steps {r.mode} (lr {r.lr_for(recipe.train):g} constant after "
        f"{r.warmup} warmup steps, {r.optimizer} optimizer, temperature {r.temperature:g}"
        + (f", {r.samples_per_prompt} samples per prompt" if r.mode != "offline" else "")
        + "); the baseline the same steps, rows, rate and optimizer treatment on hard labels.",
        "",
        "| model | main phase | refinement (wall time; generation / scoring) "
        "| exact match before | after | only after / only before solves |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for stage, role, name in (
        ("distill", "student", "KD student"),
        ("baseline", "baseline", "baseline"),
    ):
        info = stages.get(stage, {})
        phase = info.get("refine", {})
        if not phase:
            continue
        wall = f"{phase['seconds']:,.1f} s"
        if "generation_s" in phase:
            wall += f"; {phase['generation_s']:,.1f} s / {phase['scoring_s']:,.1f} s"
        before, after = models.get(f"{role}-before-refine", {}), models.get(role, {})
        em = [f"{m['exact_match']:.1%}" if "exact_match" in m else "n/a" for m in (before, after)]
        lines.append(
            f"| {name} | {info.get('seconds', 0):,.1f} s | {wall} | {em[0]} | {em[1]} "
            f"| {_paired(models, role, f'{role}-before-refine')} |"
        )
    lines += [
        "",
        "Paired, refined KD student against the continued baseline (only KD / only baseline "
        f"solves): {_paired(models, 'student', 'baseline')}.",
    ]
    return lines


def _exposure_section(models: dict, names: dict) -> list[str]:
    """The exposure-bias diagnostics of the eval stage: each model's per-token agreement with
    the teacher on the teacher's greedy text and on its own, and where its greedy answer first
    departs from the teacher's."""
    rows = {role: row["exposure"] for role, row in models.items() if row.get("exposure")}
    if not rows:
        return []
    edges = next(iter(rows.values()))["departure_bins"]
    bins = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]
    lines = [
        "",
        "## Where the students leave the teacher",
        "",
        "Top-1 agreement with the teacher token by token, on the teacher's greedy answers "
        "(teacher forcing) and on the model's own greedy answers (what the teacher would have "
        "written next at each of the model's tokens); then, over the held-out problems, the "
        "answer token at which the model's greedy answer first differs from the teacher's (same: "
        "identical answers). A high first agreement with a lower second, and early departures, "
        "are exposure bias: errors that compound as the model writes.",
        "",
        "| model | on teacher's text | on own text | same | " + " | ".join(bins) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in bins) + " |",
    ]
    for role, e in rows.items():
        counts = " | ".join(str(c) for c in e["departures"])
        lines.append(
            f"| {names.get(role, role)} | {e['agree_teacher_text']:.2%} | "
            f"{e['agree_own_text']:.2%} | {e['same']} | {counts} |"
        )
    return lines


def _samples_section(models: dict, names: dict, max_new_tokens: int) -> list[str]:
    """Each sampled test prompt, then every model's greedy answer (special tokens visible)."""
    with_samples = {role: row["samples"] for role, row in models.items() if row.get("samples")}
    if not with_samples:
        return []
    lines = ["", "## Samples", ""]
    for i, first in enumerate(next(iter(with_samples.values()))):
        lines += [f"**Prompt {i + 1}:**", "", "```", first["prompt"], "```", ""]
        for role, samples in with_samples.items():
            sample = samples[i]
            end = (
                "stopped at its end token"
                if sample["stopped"]
                else f"cut at max_new_tokens={max_new_tokens}"
            )
            lines += [f"{names[role]} ({sample['new_tokens']} tokens, {end}):", "", "```"]
            lines += [sample["output"], "```", ""]
    return lines


def _sample_prompt(results: dict) -> str:
    for row in results["models"].values():
        if row.get("samples"):
            return row["samples"][0]["prompt"].replace('"', "'")
    return "Hello"
