"""distill.compare: extra distill runs from the KD student's initial weights and data order, each
exported, logged, evaluated and compared in the report; bad entries are one line with exit 2.

One tiny quickstart run (KD offline for 4 steps; compare offline for 4, on_policy for 3, mixed
for 2, on_policy for 3 after 2 offline) is built once for the module.
"""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from tiny import ROOT, cli, main, one_line, quickstart_sets

from mlx_distill.recipe import load_recipe
from mlx_distill.run.fingerprints import stage_inputs

COMPARE = (
    "[{mode: offline}, {mode: on_policy, steps: 3}, {mode: mixed, steps: 2, lmbda: 0.5},"
    " {mode: on_policy, steps: 3, offline_steps: 2}]"
)
# On top of tiny.QUICKSTART_TINY: 4 steps, a short eval, short on-policy samples.
MORE = (
    "train.steps=4",
    "eval.num_examples=6",
    "eval.max_new_tokens=12",
    "distill.max_new_tokens=12",
    "distill.samples_per_prompt=2",
)


def _sets(runs: Path, *extra: str) -> list[str]:
    return quickstart_sets(runs, *MORE, *extra)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    runs = tmp_path_factory.mktemp("compare")
    # --jobs 1: no baseline beside the distill stage, so it keeps every BLAS thread, as the
    # resumed stage below does (a side process would halve them and change the float sums).
    args = [
        "run",
        "recipes/quickstart.yaml",
        *_sets(runs, f"distill.compare={COMPARE}"),
        "--jobs",
        "1",
    ]
    proc = cli(*args, "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs / "quickstart", json.loads(proc.stdout), args


def _weights(folder: Path) -> dict:
    return mx.load(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_compare_students_are_exported_and_start_from_the_main_ones_weights(compared):
    from mlx_lm import load

    run_dir, summary, _ = compared
    assert all(v == "ran" for v in summary["stages"].values())
    for tag in ("offline", "on_policy", "mixed", "on_policy-2"):
        model, tokenizer = load(str(run_dir / f"student-{tag}"))
        logits = model(mx.array([tokenizer.encode("12+7=")]))
        assert logits.shape[-1] >= len(tokenizer.get_vocab())
    main_w, offline_w = _weights(run_dir / "student"), _weights(run_dir / "student-offline")
    # same initial weights, same data order, same steps: bit-identical to the KD student
    assert main_w.keys() == offline_w.keys()
    assert all(mx.array_equal(main_w[k], offline_w[k]).item() for k in main_w)
    on_policy = _weights(run_dir / "student-on_policy")
    assert any(not mx.array_equal(main_w[k], on_policy[k]).item() for k in main_w)


@pytest.mark.slow
def test_metrics_and_summary_carry_each_run(compared):
    run_dir, _, _ = compared
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps: dict[str, list[int]] = {}
    for r in records:
        steps.setdefault(r["run"], []).append(r["step"])
    expect = {"distill": 4, "baseline": 4, "distill-offline": 4}
    expect |= {"distill-on_policy": 3, "distill-mixed": 2, "distill-on_policy-2": 3}
    assert {run: s for run, s in steps.items()} == {
        run: list(range(1, n + 1)) for run, n in expect.items()
    }
    on_policy = [r for r in records if r["run"] == "distill-on_policy"]
    assert on_policy[-1]["on_policy_batches"] == 3 and on_policy[-1]["gen_s"] > 0
    result = json.loads((run_dir / "distill" / "stage.json").read_text())["result"]
    runs = {c["run"]: c for c in result["compare"]}
    assert list(runs) == [
        "distill-offline",
        "distill-on_policy",
        "distill-mixed",
        "distill-on_policy-2",
    ]
    assert [c["steps"] for c in runs.values()] == [4, 3, 2, 3]
    assert runs["distill-mixed"]["lmbda"] == 0.5 and "lmbda" not in runs["distill-on_policy"]
    assert "generation_s" not in runs["distill-offline"] and "generation_s" not in result
    assert runs["distill-on_policy"]["on_policy_batches"] == 3
    # the warm-started run: two cache batches, then one sampled from the student
    assert runs["distill-on_policy-2"]["offline_steps"] == 2
    assert runs["distill-on_policy-2"]["on_policy_batches"] == 1
    assert "offline_steps" not in runs["distill-on_policy"]
    assert 0 <= runs["distill-mixed"]["on_policy_batches"] <= 2
    for c in runs.values():
        assert c["path"] == str(run_dir / ("student-" + c["run"].removeprefix("distill-")))
    assert (run_dir / "checkpoints" / "distill-on_policy" / "step-000003").is_dir()


@pytest.mark.slow
def test_report_compares_the_modes_with_the_measured_values(compared):
    run_dir, _, _ = compared
    models = json.loads((run_dir / "eval" / "results.json").read_text())["models"]
    assert {"student-offline", "student-on_policy", "student-mixed"} <= set(models)
    assert all("exact_match" in models[f"student-{t}"] for t in ("offline", "on_policy", "mixed"))
    assert models["student-offline"]["exact_match"] == models["student"]["exact_match"]
    distill = json.loads((run_dir / "distill" / "stage.json").read_text())["result"]
    baseline = json.loads((run_dir / "baseline" / "stage.json").read_text())["result"]
    report = (run_dir / "report.md").read_text()
    table = report.split("## Distill modes compared", 1)[1].split("\n\n")[2].splitlines()[2:]
    rows = {r.split(" | ")[0].strip("| "): r.strip("| ").split(" | ")[1:] for r in table}

    def em(role):
        return f"{models[role]['exact_match']:.1%}"

    expect = {
        "baseline (hard labels)": ["4", f"{baseline['seconds']:,.1f} s", "-", em("baseline")],
        "offline: the KD student": ["4", f"{distill['seconds']:,.1f} s", "-", em("student")],
    }
    for c in distill["compare"]:
        tag = c["run"].removeprefix("distill-")
        name = {"mixed": "mixed (lmbda 0.5)"}.get(c["mode"], c["mode"])
        if c.get("offline_steps"):
            name += f" after {c['offline_steps']} offline steps"
        split = "-"
        if c["mode"] != "offline":
            split = f"{c['generation_s']:,.1f} s / {c['scoring_s']:,.1f} s"
        wall = f"{c['seconds']:,.1f} s"
        expect[f"{name}: student-{tag}"] = [str(c["steps"]), wall, split, em(f"student-{tag}")]
    assert rows == expect
    assert re.search(r"\| on_policy student \(distill\.compare\) \| [\d,]+ \|", report)
    assert (run_dir / "loss_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_report_reads_each_runs_exact_match(compared, tmp_path):
    """Distinct exact-match values (tiny students solve nothing) land in their own rows."""
    from mlx_distill.context import Context
    from mlx_distill.stages.report import stage_report

    run_dir, _, _ = compared
    copy = tmp_path / "quickstart"
    shutil.copytree(run_dir, copy)
    results = json.loads((copy / "eval" / "results.json").read_text())
    roles = ["baseline", "student", "student-offline", "student-on_policy", "student-mixed"]
    roles.append("student-on_policy-2")
    for i, role in enumerate(roles):
        results["models"][role]["exact_match"] = (i + 1) / 8
    (copy / "eval" / "results.json").write_text(json.dumps(results))
    stage_report(Context(load_recipe(copy / "recipe.yaml"), copy, progress=False))
    table = (copy / "report.md").read_text().split("## Distill modes compared", 1)[1]
    rows = [r for r in table.split("\n\n")[2].splitlines()[2:]]
    assert [r.strip("| ").split(" | ")[-1] for r in rows] == [
        "12.5%",
        "25.0%",
        "37.5%",
        "50.0%",
        "62.5%",
        "75.0%",
    ]


@pytest.mark.slow
def test_a_resumed_stage_skips_finished_runs_and_redoes_the_rest(compared, tmp_path):
    run_dir, _, args = compared
    copy = tmp_path / "runs" / "quickstart"
    shutil.copytree(run_dir, copy)
    before = json.loads((copy / "distill" / "stage.json").read_text())
    kept = {
        run: (copy / "checkpoints" / run / "summary.json").stat().st_mtime_ns
        for run in ("distill", "distill-offline", "distill-on_policy", "distill-on_policy-2")
    }
    mixed = _weights(copy / "student-mixed")
    # as if killed while the mixed run trained: the stage unfinished, that run's files gone
    (copy / "distill" / "stage.json").write_text(json.dumps({**before, "status": "running"}))
    shutil.rmtree(copy / "checkpoints" / "distill-mixed")
    shutil.rmtree(copy / "student-mixed")
    args = [a.replace(str(run_dir.parent), str(tmp_path / "runs")) for a in args]
    proc = cli(*args, "--stage", "distill", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((copy / "distill" / "stage.json").read_text())["result"]
    old = before["result"]
    assert after["seconds"] == old["seconds"]  # the KD student was not trained again
    assert after["compare"][:2] == old["compare"][:2]
    assert after["compare"][3] == old["compare"][3]
    for run, mtime in kept.items():  # finished runs were skipped, not trained again
        assert (copy / "checkpoints" / run / "summary.json").stat().st_mtime_ns == mtime
    assert after["compare"][2]["path"] == str(copy / "student-mixed")
    again = _weights(copy / "student-mixed")
    assert all(mx.array_equal(mixed[k], again[k]).item() for k in mixed)


def test_empty_compare_leaves_the_fingerprints_as_before():
    plain = load_recipe(ROOT / "recipes/quickstart.yaml")
    prints, inputs = stage_inputs(plain)
    assert "compare" not in inputs["distill"]["sections"]["distill"]
    assert "offline_steps" not in inputs["distill"]["sections"]["distill"]  # nor this, at 0
    warm = load_recipe(ROOT / "recipes/quickstart.yaml", ["distill.mode=mixed"])
    warmed = load_recipe(
        ROOT / "recipes/quickstart.yaml", ["distill.mode=mixed", "distill.offline_steps=5"]
    )
    assert stage_inputs(warm)[0]["distill"] != stage_inputs(warmed)[0]["distill"]
    assert plain.to_dict()["distill"]["compare"] == []
    with_runs = load_recipe(ROOT / "recipes/quickstart.yaml", [f"distill.compare={COMPARE}"])
    changed = stage_inputs(with_runs)[0]
    assert {s for s in prints if prints[s] != changed[s]} == {"distill", "eval", "report"}
    assert [
        t
        for t, _ in load_recipe(
            None, ["distill.compare=[{mode: mixed}, {mode: mixed}]"]
        ).distill.runs()
    ] == ["mixed", "mixed-2"]


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["distill.compare=[{mode: foo}]"], "recipe key distill.compare[0].mode: 'foo' is not "),
        (["distill.compare=[{steps: 3}]"], "recipe key distill.compare[0].mode: required"),
        (["distill.compare=[{mode: on_policy, steps: 0}]"], "distill.compare[0].steps: must be"),
        (["distill.compare=[{mode: offline, lmbda: 0.2}]"], "lmbda: only for mode mixed"),
        (["distill.compare=[{mode: mixed, lmbda: 2}]"], "lmbda: must be in [0, 1], got 2.0"),
        (["distill.compare=[{mode: mixed, lamda: 1}]"], "unknown recipe key distill.compare"),
        (["distill.compare=on_policy"], "distill.compare[0]: expected a mapping"),
        (
            ["distill.compare=[{mode: offline, offline_steps: 2}]"],
            "distill.compare[0].offline_steps: only for mode on_policy or mixed",
        ),
        (
            ["distill.compare=[{mode: mixed, steps: 3, offline_steps: 3}]"],
            "distill.compare[0].offline_steps: must be in [0, 3) (the run's steps), got 3",
        ),
        (
            [
                "distill.mode=on_policy",
                "distill.offline_steps=2",
                "distill.compare=[{mode: on_policy, steps: 2}]",
            ],
            "distill.compare[0].offline_steps: must be in [0, 2)",
        ),
        (["distill.offline_steps=2"], "recipe key distill.offline_steps: only for mode on_policy"),
        (["distill.mode=mixed", "distill.offline_steps=-1"], "offline_steps: must be in [0, 4)"),
        (
            [
                "distill.mode=on_policy",
                "distill.offline_steps=2",
                "stages=tokenizer,teacher,distill,baseline,eval,report",
            ],
            "distill.offline_steps: the distill stage trains on the teacher cache (on_policy, "
            "offline_steps 2), and stages has no cache stage",
        ),
        (
            [
                "distill.mode=on_policy",
                "stages=tokenizer,teacher,distill,baseline,eval,report",
                "distill.compare=[{mode: on_policy}, {mode: mixed}]",
            ],
            "distill.compare[1].mode: mixed trains on the teacher cache, and stages has no cache",
        ),
    ],
)
def test_bad_entries_are_one_line_before_any_work(extra, expect, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    code, _, err = main(monkeypatch, capsys, "run", "recipes/quickstart.yaml", *_sets(runs, *extra))
    line = one_line(code, err)
    assert expect in line and "--set distill." in line
    assert not runs.exists()


def test_gemini_teacher_refuses_an_on_policy_compare_entry(tmp_path, monkeypatch, capsys):
    code, _, err = main(
        monkeypatch,
        capsys,
        "run",
        "recipes/gemini_to_qwen2.5-0.5b_seqkd.yaml",
        "--set",
        "distill.compare=[{mode: offline}, {mode: on_policy}]",
        "--set",
        f"runs_dir={tmp_path}",
    )
    line = one_line(code, err)
    assert "recipe key distill.compare[1].mode: on_policy needs a teacher" in line
    assert "Gemini cannot score text it did not write" in line
    assert list(tmp_path.iterdir()) == []


def test_a_distributed_group_refuses_an_on_policy_compare_entry():
    from mlx_distill.errors import BadInput
    from mlx_distill.run.preflight import check_group

    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", ["distill.compare=[{mode: offline}]"])
    check_group(recipe, ["distill"], 2)  # offline entries train data-parallel like the main run
    recipe.distill.compare = load_recipe(
        None, ["distill.compare=[{mode: offline}, {mode: mixed}]"]
    ).distill.compare
    with pytest.raises(BadInput, match=r"recipe key distill.compare\[1\].mode: mixed runs in one"):
        check_group(recipe, ["distill"], 2)
