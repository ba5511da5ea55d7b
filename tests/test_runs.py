"""Runs never lie: each refusal is one line with exit 2 and leaves the run directory byte-for-byte
as it was; a killed run leaves no side process behind; a second command on a held run is refused.

One tiny taught run (tokenizer, teacher, cache of 16 rows in 2 shards) is built once; each test
works on its own copy. Refusals go through `cli.main` in this process (no new interpreter per
case); the kill test needs real processes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import ROOT, cli, main, one_line, quickstart_sets, tree


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    runs = tmp_path_factory.mktemp("taught")
    proc = cli("teach", "recipes/quickstart.yaml", *quickstart_sets(runs), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs / "quickstart"


@pytest.fixture
def run(taught, tmp_path):
    """A private copy of the taught run: (runs_dir, run_dir)."""
    shutil.copytree(taught, tmp_path / "runs" / "quickstart")
    return tmp_path / "runs", tmp_path / "runs" / "quickstart"


# -- recipe changes that invalidate an upstream stage ------------------------------------------


def test_refused_train_names_the_field_and_rewrites_nothing(run, monkeypatch, capsys):
    runs, run_dir = run
    before = tree(run_dir)
    code, _, err = main(
        monkeypatch, capsys, "train", "recipes/quickstart.yaml", *quickstart_sets(runs, "cache.k=8")
    )
    line = one_line(code, err)
    rebuild = " ".join(
        ["mlx-distill run recipes/quickstart.yaml --stage cache", *quickstart_sets(runs)]
    )
    assert line == (
        "error: cache.k changed 16 -> 8 since the teacher cache was built; the distill stage "
        f"reads it, so rebuild it first: {rebuild} --set cache.k=8"
    )
    assert tree(run_dir) == before  # recipe.yaml still says k: 16


def test_refused_train_on_cache_temperature(run, monkeypatch, capsys):
    runs, run_dir = run
    before = tree(run_dir)
    extra = ("cache.temperature=1.0", "loss.temperature=1.0")
    code, _, err = main(
        monkeypatch, capsys, "train", "recipes/quickstart.yaml", *quickstart_sets(runs, *extra)
    )
    line = one_line(code, err)
    assert line.startswith("error: cache.temperature changed 2.0 -> 1.0 since the teacher cache")
    assert line.endswith("--set cache.temperature=1.0 --set loss.temperature=1.0")
    assert tree(run_dir) == before


def test_refused_train_on_tokenizer_path(run, monkeypatch, capsys, tmp_path):
    runs, run_dir = run
    tok = tmp_path / "tok"  # the same tokenizer in another folder: same vocabulary, new path
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (ROOT / "data/quickstart/teacher" / name).exists():
            shutil.copy(ROOT / "data/quickstart/teacher" / name, tok / name)
    before = tree(run_dir)
    code, _, err = main(
        monkeypatch,
        capsys,
        "train",
        "recipes/quickstart.yaml",
        *quickstart_sets(runs, f"tokenizer.path={tok}"),
    )
    line = one_line(code, err)
    assert line.startswith(
        f"error: tokenizer.path changed data/quickstart/teacher -> {tok} since the tokenizer stage "
        "ran; the distill and baseline stages read it, so rebuild it (with teacher, cache) first: "
        "mlx-distill teach recipes/quickstart.yaml"
    )
    assert tree(run_dir) == before


# -- inputs checked before any stage writes ---------------------------------------------------


def test_non_utf8_data_file_names_file_and_line(run, monkeypatch, capsys, tmp_path):
    runs, run_dir = run
    good = (ROOT / "data/quickstart/train.jsonl").read_bytes().splitlines(keepends=True)
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(
        b"".join(good[:2]) + good[2].replace(b'"prompt": "', b'"prompt": "\xe9', 1) + good[3]
    )
    before = tree(run_dir)
    code, _, err = main(
        monkeypatch,
        capsys,
        "run",
        "recipes/quickstart.yaml",
        *quickstart_sets(runs, f"data.train={bad}"),
    )
    line = one_line(code, err)
    assert line.startswith(f"error: {bad} line 3: not UTF-8 (byte b'\\xe9' at column ")
    assert tree(run_dir) == before


def _teacher_copy(tmp_path: Path, skip=()) -> Path:
    folder = tmp_path / "teacher"
    shutil.copytree(ROOT / "data/quickstart/teacher", folder, ignore=shutil.ignore_patterns(*skip))
    return folder


def test_broken_tokenizer_json_is_named_with_its_folder(monkeypatch, capsys, tmp_path):
    teacher = _teacher_copy(tmp_path)
    text = (teacher / "tokenizer.json").read_text()
    (teacher / "tokenizer.json").write_text(text[: len(text) // 2])
    runs = tmp_path / "runs"
    extra = (f"tokenizer.path={teacher}", f"teacher.path={teacher}")
    code, _, err = main(
        monkeypatch, capsys, "teach", "recipes/quickstart.yaml", *quickstart_sets(runs, *extra)
    )
    line = one_line(code, err)
    assert line.startswith(f"error: {teacher / 'tokenizer.json'} line ")
    assert ": invalid JSON: " in line
    assert not runs.exists()


def test_teacher_without_safetensors_is_refused_before_any_stage(monkeypatch, capsys, tmp_path):
    teacher = _teacher_copy(tmp_path, skip=("*.safetensors",))
    runs = tmp_path / "runs"
    extra = (f"tokenizer.path={teacher}", f"teacher.path={teacher}")
    code, _, err = main(
        monkeypatch, capsys, "teach", "recipes/quickstart.yaml", *quickstart_sets(runs, *extra)
    )
    line = one_line(code, err)
    assert line == (
        f"error: recipe key teacher.path: no .safetensors weights in {teacher} (weights are read "
        "only from safetensors files)"
    )
    assert not runs.exists()  # the tokenizer and teacher stages wrote nothing


def test_broken_chat_template_is_named(monkeypatch, capsys, tmp_path):
    teacher = _teacher_copy(tmp_path)
    (teacher / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    runs = tmp_path / "runs"
    extra = (f"tokenizer.path={teacher}", f"teacher.path={teacher}")
    code, _, err = main(
        monkeypatch, capsys, "teach", "recipes/quickstart.yaml", *quickstart_sets(runs, *extra)
    )
    line = one_line(code, err)
    assert line.startswith(f"error: {teacher / 'chat_template.jinja'} line 1: the chat template")
    assert not runs.exists()


def _other_vocab_model(path: Path) -> Path:
    from mlx_distill.models import build_model, save_model
    from mlx_distill.recipe import ModelConfig
    from mlx_distill.text.tokenizer import train_sentencepiece

    texts = [f"{i} plus {i + 1} is {2 * i + 1}" for i in range(300)]
    tok = train_sentencepiece(texts, path / "tok", vocab_size=32)
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    model, config = build_model(cfg, 33)
    return save_model(model, config, tok, path / "model")


def test_pretrained_student_needs_its_own_tokenizer(monkeypatch, capsys, tmp_path):
    student = _other_vocab_model(tmp_path)
    runs = tmp_path / "runs"
    extra = ("student.init=pretrained", f"student.path={student}")
    code, _, err = main(
        monkeypatch, capsys, "run", "recipes/quickstart.yaml", *quickstart_sets(runs, *extra)
    )
    line = one_line(code, err)
    assert line.startswith(
        "error: recipe key tokenizer.path: the tokenizer in data/quickstart/teacher (vocab hash "
    )
    assert f"does not match the student's (student.init pretrained) in {student}" in line
    assert not runs.exists()


def test_pretrained_student_without_tokenizer_path(monkeypatch, capsys, tmp_path):
    student = _other_vocab_model(tmp_path)
    runs = tmp_path / "runs"
    code, _, err = main(
        monkeypatch,
        capsys,
        "run",
        "recipes/quickstart.yaml",
        *quickstart_sets(
            runs, "tokenizer.path=null", "teacher.path=null", "student.init=pretrained"
        ),
        *("--set", f"student.path={student}"),
    )
    line = one_line(code, err)
    assert line == (
        "error: recipe key tokenizer.path: not set, so a new tokenizer would be trained, but the "
        f"student's (student.init pretrained) is in {student}; set tokenizer.path: {student}"
    )
    assert not runs.exists()


# -- smaller usage errors ---------------------------------------------------------------------


def test_unknown_option_is_one_line(monkeypatch, capsys):
    code, _, err = main(monkeypatch, capsys, "run", "recipes/quickstart.yaml", "--forse")
    assert one_line(code, err) == (
        "error: mlx-distill run: No such option '--forse'. (Did you mean one of: '--force', "
        "'--jobs', '--set'?) (see mlx-distill run --help)"
    )


def test_set_error_names_the_set(monkeypatch, capsys):
    code, _, err = main(monkeypatch, capsys, "run", "recipes/quickstart.yaml", "--set", "cache.k=x")
    assert one_line(code, err) == (
        "error: --set cache.k=x: recipe key cache.k: expected int, got 'x'"
    )


def test_zero_temperature_blames_one_key(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss:\n  temperature: 0\n")
    code, _, err = main(monkeypatch, capsys, "run", str(recipe))
    assert one_line(code, err) == (
        f"error: {recipe}: recipe key loss.temperature: must be > 0, got 0.0"
    )


def test_chat_on_missing_path_says_not_found(monkeypatch, capsys, tmp_path):
    code, _, err = main(monkeypatch, capsys, "chat", str(tmp_path / "nope"))
    assert one_line(code, err) == f"error: chat PATH: model folder not found: {tmp_path / 'nope'}"


# -- a corrupt shard is rebuilt alone ---------------------------------------------------------


def test_corrupt_shard_is_named_and_repaired_alone(run, monkeypatch, capsys):
    _, run_dir = run
    cache = run_dir / "cache"
    shard = cache / "shard-000001.safetensors"
    original, other = shard.read_bytes(), (cache / "shard-000000.safetensors").stat()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    code, _, err = main(monkeypatch, capsys, "cache", "verify", str(cache))
    assert one_line(code, err) == (
        f"error: cache {cache}: shard shard-000001.safetensors is corrupted (checksum mismatch); "
        f"rebuild only the damaged shards: mlx-distill cache repair {cache}"
    )
    code, out, err = main(monkeypatch, capsys, "cache", "repair", str(cache), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["repaired"] == ["shard-000001.safetensors"]
    assert shard.read_bytes() == original  # rescored to the same bytes
    kept = (cache / "shard-000000.safetensors").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (other.st_ino, other.st_mtime_ns)  # not rewritten
    code, out, _ = main(monkeypatch, capsys, "cache", "repair", str(cache), "--json")
    assert code == 0 and json.loads(out)["repaired"] == []


# -- one process per run; side processes die with their parent --------------------------------


def test_held_run_is_refused_with_the_holders_pid(run, monkeypatch, capsys):
    import fcntl

    runs, run_dir = run
    with open(run_dir / "run.lock", "w") as held:  # another holder: a separate open file
        held.write("424242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        before = tree(run_dir)
        code, _, err = main(
            monkeypatch, capsys, "train", "recipes/quickstart.yaml", *quickstart_sets(runs)
        )
        assert one_line(code, err) == (
            f"error: {run_dir} is in use by pid 424242 (another mlx-distill command on this run); "
            "wait for it to finish or stop it, then rerun"
        )
        assert tree(run_dir) == before


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    # A dead child of a killed parent may linger as a zombie where PID 1 does not reap it.
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.slow
def test_killed_run_leaves_no_side_process_and_its_lock_is_taken_over(run, monkeypatch, capsys):
    runs, run_dir = run
    parent = subprocess.Popen(
        [sys.executable, "-m", "mlx_distill", "train", "recipes/quickstart.yaml"]
        + quickstart_sets(runs, "train.steps=100000")
        + ["--no-progress"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    side = None
    for line in parent.stderr:
        if "running beside distill (second process, pid " in line:
            side = int(line.rsplit("pid ", 1)[1].rstrip(")\n"))
        if side is not None and line.startswith("[baseline] running"):
            break  # the side process is training (its own log line)
    assert side is not None, "no side process started"
    # While it runs, a second command on the same run is refused with the holder's pid.
    code, _, err = main(
        monkeypatch, capsys, "train", "recipes/quickstart.yaml", *quickstart_sets(runs)
    )
    assert f"is in use by pid {parent.pid} " in one_line(code, err)

    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 15  # "a few seconds"; generous for a loaded 2-core CI box
    while not _gone(side) and time.time() < deadline:
        time.sleep(0.1)
    assert _gone(side), f"side process {side} outlived its killed parent"

    # The dead parent's lock is taken over; the run then trains to the end.
    proc = cli(
        "train", "recipes/quickstart.yaml", *quickstart_sets(runs), "--no-progress", "--json"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[run] took over the lock of pid {parent.pid} (gone)" in proc.stderr
    assert json.loads(proc.stdout)["stages"] == {"distill": "ran", "baseline": "ran"}
    assert (run_dir / "run.lock").read_text() == ""  # released

    # The exported student carries the tokenizer its weights came with (teacher_layers: the
    # teacher's).
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        teacher_file = ROOT / "data/quickstart/teacher" / name
        assert (run_dir / "student" / name).read_bytes() == teacher_file.read_bytes()

    # Rebuilding the cache with another k leaves the trained student out of date: `eval` on the
    # run refuses (its recipe.yaml no longer describes that student) and writes nothing.
    code, _, err = main(
        monkeypatch, capsys, "teach", "recipes/quickstart.yaml", *quickstart_sets(runs, "cache.k=8")
    )
    assert code == 0, err
    before = tree(run_dir)
    code, _, err = main(monkeypatch, capsys, "eval", str(run_dir))
    assert one_line(code, err) == (
        "error: the cache stage was rerun since the KD student was trained; the eval stage reads "
        f"it, so rebuild it first: mlx-distill run {run_dir / 'recipe.yaml'} --stage distill"
    )
    assert tree(run_dir) == before


# -- first-class skipping: no baseline, no test split ------------------------------------------


@pytest.mark.slow
def test_run_without_baseline_or_test_split(run, monkeypatch, capsys):
    runs, run_dir = run
    extra = (
        "data.test=null",
        "data.valid=data/quickstart/valid.jsonl",
        "eval.num_examples=4",
        "eval.max_new_tokens=8",
    )
    args = ("run", "recipes/quickstart.yaml", *quickstart_sets(runs, *extra))
    proc = cli(*args, "--no-baseline", "--no-progress", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout)["stages"]
    assert outcome["distill"] == "ran" and "baseline" not in outcome
    assert outcome["eval"] == "ran" and outcome["report"] == "ran"
    assert not (run_dir / "baseline").exists()
    note = "data.test not set: perplexity and agreement on data.valid, exact match skipped"
    assert f"[eval] {note}" in proc.stderr.splitlines()
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["split"] == "valid" and results["note"] == note
    assert set(results["models"]) == {"teacher", "student"}
    for row in results["models"].values():
        assert "exact_match" not in row and row["perplexity"] >= 1.0
    report = (run_dir / "report.md").read_text()
    assert "4 examples of the validation split `data/quickstart/valid.jsonl`" in report
    assert "No baseline in this run" in report
    # --stage eval needs no edited stage list: with the flag the baseline is no stage of the run
    code, _, err = main(monkeypatch, capsys, *args, "--stage", "eval")
    assert "the baseline stage has not run yet" in one_line(code, err)
    code, _, err = main(monkeypatch, capsys, *args, "--no-baseline", "--stage", "eval")
    assert code == 0, err
    assert "[eval] up to date" in err


def test_leaving_the_baseline_out_reruns_eval_and_report_only():
    """eval and report show the baseline, so switching it off makes them stale (and no stage
    upstream of them); at the default their fingerprints are what they were."""
    from mlx_distill.recipe import load_recipe
    from mlx_distill.run.fingerprints import stage_inputs

    with_it = stage_inputs(load_recipe("recipes/quickstart.yaml"))[0]
    without = stage_inputs(load_recipe("recipes/quickstart.yaml", ["baseline=false"]))[0]
    changed = {name for name in with_it if with_it[name] != without[name]}
    assert changed == {"eval", "report"}
