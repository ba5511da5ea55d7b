"""CLI error paths: one clear line, exit code 2, no traceback, nothing half-written."""

import functools
import json
import os
import sys

import pytest
import tiny

cli = functools.partial(tiny.cli, timeout=300)  # `python -m mlx_distill ARGS` from the root


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.rstrip().endswith(errors[0])
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_help_is_fast_and_lists_commands():
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("run", "teach", "train", "eval", "chat", "cache", "bench", "doctor"):
        assert command in proc.stdout


def test_missing_recipe(tmp_path):
    proc = cli("run", str(tmp_path / "nope.yaml"))
    assert_one_line_error(proc, "recipe file not found", "nope.yaml")


def test_unknown_key_in_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"runs_dir: {tmp_path / 'runs'}\nstudent:\n  modle: {{}}\n")
    proc = cli("run", str(path))
    assert_one_line_error(proc, "student.modle", "did you mean 'model'")
    assert not (tmp_path / "runs").exists()


def test_wrong_type_from_set(tmp_path):
    proc = cli("run", "recipes/quickstart.yaml", "--set", "train.batch_size=lots")
    assert_one_line_error(proc, "train.batch_size", "expected int")


def test_missing_data_file_leaves_nothing(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"runs_dir: {tmp_path / 'runs'}\ndata:\n  train: {tmp_path / 'missing.jsonl'}\n"
    )
    proc = cli("run", str(path))
    assert_one_line_error(proc, "data.train", "missing.jsonl")
    assert not (tmp_path / "runs").exists()


def test_bad_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"runs_dir: {tmp_path / 'runs'}\nstages: [tokenizer]\ndata:\n  train: {bad}\n")
    proc = cli("run", str(path))
    assert_one_line_error(proc, "train.jsonl line 2")
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_resolved_recipe_and_writes_nothing(tmp_path):
    proc = cli(
        "run",
        "recipes/quickstart.yaml",
        "--dry-run",
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "train.lr=1e-5",
    )
    assert proc.returncode == 0, proc.stderr
    assert "lr: 1.0e-05" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_doctor_json_reports_backend_without_key_value():
    proc = cli("doctor", "--json", env={"GEMINI_API_KEY": "secret-value-123"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["backend"] in ("cpu", "metal", "cuda")
    assert report["gemini_api_key_present"] is True
    assert report["matmul_fp32_gflops"] > 0
    assert "secret-value-123" not in proc.stdout + proc.stderr
    if sys.platform == "linux" and os.environ.get("MLX_DISTILL_BLAS") != "off":
        assert report["blas"].startswith("OpenBLAS")


@pytest.mark.parametrize("size", ["1,2", "a,b,c", "0,4,4"])
def test_bench_bad_size(size):
    proc = cli("bench", "loss", "--size", size)
    assert_one_line_error(proc, "--size")


def test_cache_info_on_missing_path(tmp_path):
    proc = cli("cache", "info", str(tmp_path / "nothing"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def _model_folder(path, texts, vocab_size):
    from mlx_distill.models import build_model, save_model
    from mlx_distill.recipe import ModelConfig
    from mlx_distill.text.tokenizer import train_sentencepiece

    tok_dir = train_sentencepiece(texts, path / "tok", vocab_size=vocab_size)
    cfg = ModelConfig(
        hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32
    )
    model, config = build_model(cfg, vocab_size + 1)
    return save_model(model, config, tok_dir, path / "model")


def test_student_teacher_vocab_mismatch(tmp_path):
    from mlx_distill.tasks import arithmetic

    texts = [p["prompt"] + "\n" + p["completion"] for p in arithmetic.generate(200, 0)]
    teacher = _model_folder(tmp_path / "a", texts, 120)
    student_tok = _model_folder(tmp_path / "b", texts[:100] + ["other words " * 9] * 50, 110)
    proc = cli(
        "run",
        "recipes/quickstart.yaml",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        "--set",
        f"teacher.path={teacher}",
        "--set",
        f"tokenizer.path={student_tok}",
    )
    # the quickstart's student is cut from the teacher: it needs the teacher's tokenizer
    assert_one_line_error(proc, "teacher_layers copies the teacher's embeddings")
    assert not (tmp_path / "runs").exists()


def test_dry_run_checks_the_data_and_writes_nothing(tmp_path):
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"prompt": "1 + 1?", "completion": "2"}\n{"prompt": 3}\n')
    proc = cli(
        "run",
        "recipes/quickstart.yaml",
        "--dry-run",
        *tiny.sets(f"runs_dir={tmp_path / 'runs'}", f"data.test={bad}"),
    )
    assert_one_line_error(proc, "test.jsonl line 2")
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_library_warning_is_one_line(tmp_path):
    """A teacher with more output rows than its tokenizer has ids (a padded embedding, as real
    models have) is scored with the padded rows ignored: one `warning:` line, no source line."""
    from mlx_distill.models import build_model, save_model
    from mlx_distill.recipe import ModelConfig

    tokenizer = tiny.ROOT / "data" / "quickstart" / "teacher"
    vocab = tiny.vocab_of(tokenizer)
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    model, config = build_model(cfg, vocab + 7)
    teacher = save_model(model, config, tokenizer, tmp_path / "padded")
    proc = cli(
        "teach",
        "recipes/quickstart.yaml",
        "--no-progress",
        *tiny.quickstart_sets(tmp_path / "runs", f"teacher.path={teacher}"),
    )
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "padded rows" in line]
    assert warned == [
        f"warning: teacher {teacher}: {vocab + 7} output rows for {vocab} tokenizer ids; "
        "ignoring the 7 padded rows"
    ], proc.stderr
    assert "Warning" not in proc.stderr and "warnings.warn" not in proc.stderr
