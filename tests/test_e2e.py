"""End to end on the CPU: the real quickstart recipe, shrunk to a few steps, in a temp dir."""

import json
import os
import re
import subprocess
import sys

import pytest
from tiny import ROOT, cli, sets

SHRINK = [
    "data.max_train=48",
    "train.steps=4",
    "train.log_every=2",
    "train.batch_size=8",
    "eval.num_examples=6",
    "eval.max_new_tokens=12",
    "cache.shard_rows=20",
    "export.quantize_bits=4",
]


def run_cli(*args, env=None):
    proc = cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = sets(*SHRINK, f"runs_dir={runs}")
    proc = run_cli("run", "recipes/quickstart.yaml", *args, "--json", "--no-progress")
    (runs / "stderr.txt").write_text(proc.stderr)  # both processes' log lines
    return runs / "quickstart", args, json.loads(proc.stdout)


@pytest.mark.slow
def test_every_stage_ran_and_recorded(quickstart):
    run_dir, _, summary = quickstart
    assert set(summary["stages"]) == {
        "tokenizer",
        "teacher",
        "cache",
        "distill",
        "baseline",
        "eval",
        "report",
    }
    assert all(v == "ran" for v in summary["stages"].values())
    for stage in summary["stages"]:
        info = json.loads((run_dir / stage / "stage.json").read_text())
        assert info["status"] == "done" and len(info["fingerprint"]) == 16
    assert (run_dir / "recipe.yaml").read_text().count("max_train: 48") == 1


@pytest.mark.slow
def test_memory_plan_is_checked_once_with_the_baseline_beside(quickstart):
    """The baseline's side process runs under its parent's plan (which covered both trainings
    side by side); it neither plans nor prints the table again."""
    run_dir, _, _ = quickstart
    err = (run_dir.parent / "stderr.txt").read_text()
    assert "[baseline] running beside distill" in err
    assert err.count("memory plan (") == 1


@pytest.mark.slow
def test_training_logged_both_runs(quickstart):
    run_dir, _, _ = quickstart
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_run = {r["run"] for r in records}
    assert by_run == {"distill", "baseline"}
    valid = {r["run"]: r for r in records if "valid_loss" in r}
    # data.valid is set and eval_every is 0: one validation loss per run, after its last step.
    assert {run: r["step"] for run, r in valid.items()} == {"distill": 4, "baseline": 4}
    assert all(0 < r["valid_loss"] < 20 for r in valid.values())
    records = [r for r in records if "valid_loss" not in r]
    distill = [r for r in records if r["run"] == "distill"]
    assert [r["step"] for r in distill] == [2, 4]
    assert all(r["kd"] > 0 and 0 < r["covered_mass"] <= 1.0 + 1e-6 for r in distill)


@pytest.mark.slow
def test_cache_manifest_matches_data(quickstart):
    run_dir, _, _ = quickstart
    manifest = json.loads((run_dir / "cache" / "manifest.json").read_text())
    assert manifest["rows"] == 48 and manifest["complete"]


@pytest.mark.slow
def test_report_has_table_plot_and_chat_hint(quickstart):
    run_dir, _, _ = quickstart
    report = (run_dir / "report.md").read_text()
    for row in (
        "| teacher |",
        "| KD student |",
        "| baseline (hard labels) |",
        "| KD student, 4-bit export",
    ):
        assert row in report
    assert "Seed 0" in report
    assert re.search(r"^\| teacher \| [\d,]{7,} \| ", report, flags=re.M)  # its size is shown
    assert re.search(r"only the KD student solves \d+, only the baseline \d+ \(two-sided", report)
    assert "loss `forward_kl`, kd_weight 0.5, temperature 2.0, cache `topk` k=16." in report
    assert f"mlx-distill chat {run_dir / 'student'}" in report.splitlines()[-3]
    assert (run_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    for role in ("teacher", "student", "baseline", "student-q4"):
        row = results["models"][role]
        assert 0.0 <= row["exact_match"] <= 1.0
        assert len(row["solved"]) == round(row["exact_match"] * results["num_examples"])
        assert results["models"][role]["perplexity"] > 1.0
        assert len(row["samples"]) == 3 and all(
            isinstance(x["stopped"], bool) for x in row["samples"]
        )
    # eval.max_new_tokens=12 cuts the teacher's worked solutions short, and the report says so.
    assert all(
        not x["stopped"] and x["new_tokens"] == 12 for x in results["models"]["teacher"]["samples"]
    )
    assert "## Samples" in report and "teacher (12 tokens, cut at max_new_tokens=12)" in report


@pytest.mark.slow
def test_student_loads_with_mlx_lm_and_matches(quickstart):
    import mlx.core as mx
    from mlx_lm import load

    from mlx_distill.models import hidden_states, lm_head_weight

    run_dir, _, _ = quickstart
    model, tokenizer = load(str(run_dir / "student"))
    ids = tokenizer.encode("Ana has 12 apples.", add_special_tokens=False)
    tokens = mx.array([ids])
    logits = model(tokens)
    fused_view = hidden_states(model, tokens) @ lm_head_weight(model).T
    assert mx.allclose(logits, fused_view, atol=1e-4).item()
    assert tokenizer.eos_token == "<|end|>"
    quantized, _ = load(str(run_dir / "student-q4"))
    config = json.loads((run_dir / "student-q4" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    # 4-bit weights stay close to the fp32 student on the same input.
    assert mx.abs(quantized(tokens) - logits).max().item() < 0.5 * mx.abs(logits).max().item()


@pytest.mark.slow
def test_mlx_lm_generate_cli_offline(quickstart):
    run_dir, _, _ = quickstart
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(run_dir / "student"),
            "--prompt",
            "Ana has 12 apples.",
            "--max-tokens",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Generation:" in proc.stdout or "tokens-per-sec" in proc.stdout


@pytest.mark.slow
def test_chat_reads_a_pipe(quickstart):
    run_dir, _, _ = quickstart
    pipe = "Ana has 12 apples.\n/reset\nHow many?\n/quit\nnever read\n"
    proc = cli("chat", str(run_dir / "student"), "--max-tokens", "4", input=pipe, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("tokens/s]") == 2
    assert "[conversation cleared]" in proc.stdout


@pytest.mark.slow
def test_side_process_baseline_equals_sequential(quickstart, tmp_path):
    """--jobs 2 (the default) trains the baseline in a second process; --jobs 1 in-process."""
    import mlx.core as mx

    run_dir, args, _ = quickstart
    args = [f"runs_dir={tmp_path}" if a.startswith("runs_dir=") else a for a in args]
    stages = ("--stage", "tokenizer", "--stage", "teacher", "--stage", "baseline")
    # One BLAS thread, as the side process has: OpenBLAS sums in another order with two threads.
    one_thread = {"OPENBLAS_NUM_THREADS": "1"}
    run_cli(
        "run",
        "recipes/quickstart.yaml",
        *args,
        *stages,
        "--jobs",
        "1",
        "--no-progress",
        env=one_thread,
    )
    side = mx.load(str(run_dir / "baseline" / "model.safetensors"))
    alone = mx.load(str(tmp_path / "quickstart" / "baseline" / "model.safetensors"))
    assert side.keys() == alone.keys()
    for key in side:
        assert mx.allclose(side[key], alone[key], atol=1e-5).item(), key
    kd = mx.load(str(run_dir / "student" / "model.safetensors"))  # same init, other loss
    assert any(not mx.allclose(side[k], kd[k]).item() for k in side)


@pytest.mark.slow
def test_rerun_skips_and_changes_rerun_downstream(quickstart):
    run_dir, args, _ = quickstart
    again = json.loads(run_cli("run", "recipes/quickstart.yaml", *args, "--json").stdout)
    assert set(again["stages"].values()) == {"skipped"}
    changed = json.loads(
        run_cli(
            "run",
            "recipes/quickstart.yaml",
            *args,
            "--set",
            "loss.kd_weight=0.9",
            "--json",
            "--no-progress",
        ).stdout
    )["stages"]
    assert changed == {
        "tokenizer": "skipped",
        "teacher": "skipped",
        "cache": "skipped",
        "distill": "ran",
        "baseline": "skipped",
        "eval": "ran",
        "report": "ran",
    }


@pytest.mark.slow
def test_teacher_recipe_trains_tokenizer_and_teacher(tmp_path):
    """recipes/quickstart_teacher.yaml, shrunk: SentencePiece + a tiny teacher + its eval."""
    first = [
        f"runs_dir={tmp_path}",
        "data.max_train=64",
        "tokenizer.vocab_size=160",
        "teacher.model.hidden_size=32",
        "teacher.model.num_layers=1",
        "teacher.model.num_heads=2",
        "teacher.model.intermediate_size=64",
        "teacher.train.steps=3",
        "teacher.train.batch_size=8",
        "teacher.train.checkpoint_every=2",
        "eval.num_examples=4",
        "eval.max_new_tokens=8",
    ]
    summary = json.loads(
        run_cli(
            "run", "recipes/quickstart_teacher.yaml", *sets(*first), "--json", "--no-progress"
        ).stdout
    )
    assert summary["stages"] == {"tokenizer": "ran", "teacher": "ran", "eval": "ran"}
    run_dir = tmp_path / "quickstart_teacher"
    teacher = run_dir / "teacher" / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sentencepiece.model"):
        assert (teacher / name).exists()
    config = json.loads((teacher / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["vocab_size"] == 160 + 1  # + newline marker
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"teacher"}
    ckpts = sorted(p.name for p in (run_dir / "checkpoints" / "teacher").iterdir())
    assert ckpts == ["step-000002", "step-000003"]

    # Second phase (recipes/quickstart_teacher_more.yaml): continues from the first teacher.
    more = [
        f"runs_dir={tmp_path}",
        "data.max_train=64",
        f"tokenizer.path={teacher}",
        f"teacher.init={teacher}",
        "teacher.train.steps=1",
        "teacher.train.lr=1e-12",
        "teacher.train.batch_size=8",
        "eval.num_examples=4",
        "eval.max_new_tokens=8",
    ]
    run_cli("run", "recipes/quickstart_teacher_more.yaml", *sets(*more), "--no-progress")
    import mlx.core as mx

    first = mx.load(str(teacher / "model.safetensors"))
    second = mx.load(str(tmp_path / "quickstart_teacher_more/teacher/model/model.safetensors"))
    assert first.keys() == second.keys()
    assert all(mx.allclose(first[k], second[k], atol=1e-6).item() for k in first)


@pytest.mark.slow
def test_teach_then_train_run_their_stages_only(tmp_path):
    args = sets(*SHRINK, f"runs_dir={tmp_path}")
    taught = json.loads(run_cli("teach", "recipes/quickstart.yaml", *args, "--json").stdout)
    assert taught["stages"] == {"tokenizer": "ran", "teacher": "ran", "cache": "ran"}
    assert not (tmp_path / "quickstart" / "student").exists()
    trained = json.loads(run_cli("train", "recipes/quickstart.yaml", *args, "--json").stdout)
    assert trained["stages"] == {"distill": "ran", "baseline": "ran"}
    assert (tmp_path / "quickstart" / "student" / "model.safetensors").exists()
    assert not (tmp_path / "quickstart" / "report.md").exists()


def test_samples_are_greedy_and_say_when_they_were_cut():
    import mlx.core as mx

    from mlx_distill.evaluate import generate_samples
    from mlx_distill.models import load_model
    from mlx_distill.text.tokenizer import prompt_text

    model, tokenizer, _ = load_model(ROOT / "data" / "quickstart" / "teacher")
    prompt = "Ana has 347 apples. Ana buys 285 more. How many apples now?"
    (whole,) = generate_samples(model, tokenizer, [prompt], max_new_tokens=200)
    assert whole["stopped"] and whole["output"].endswith(tokenizer.eos_token)
    assert "Answer: 632" in whole["output"]
    (cut,) = generate_samples(model, tokenizer, [prompt], max_new_tokens=3)
    assert not cut["stopped"] and cut["new_tokens"] == 3
    # Greedy: each new token is the argmax of the model's own logits on the text so far.
    ids = tokenizer.encode(prompt_text(tokenizer, prompt), add_special_tokens=False)
    for _ in range(3):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    assert whole["output"].startswith(cut["output"])
    assert tokenizer.decode(ids[-3:], skip_special_tokens=False) == cut["output"]
