"""The sound optimizer, the refinement phase (refine.*) and the invariants distillation must keep.

The invariants run the shipped quickstart teacher (8 layers, 99.4% exact match) as its own
student, at the refinement settings the quickstart recipe resolves to (`refine_recipe`): a
student that is the teacher must stay the teacher, on-policy and offline; a perturbed student's
on-policy loss on a fixed batch must fall.
"""

from __future__ import annotations

import dataclasses
import json
import math

import mlx.core as mx
import numpy as np
import pytest
from tiny import ROOT, cli, main, one_line, quickstart_sets

from mlx_distill.cache import build_token_cache, open_cache
from mlx_distill.cache.loader import Loader
from mlx_distill.evaluate import exact_match, exposure, first_departure
from mlx_distill.models import load_model
from mlx_distill.recipe import TrainConfig, load_recipe
from mlx_distill.stages.distill import refine_recipe
from mlx_distill.tasks import get_checker
from mlx_distill.teachers.local import LocalTeacher
from mlx_distill.text.chat import encode_records
from mlx_distill.text.data import read_jsonl
from mlx_distill.text.tokenizer import prompt_text
from mlx_distill.train.log import TrainCallback
from mlx_distill.train.loss import make_loss
from mlx_distill.train.onpolicy import LOSS_TAG, OnPolicySource, onpolicy_loss
from mlx_distill.train.trainer import adamw, carry_optimizer, schedule, train

TEACHER = ROOT / "data" / "quickstart" / "teacher"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

# -- the optimizer ---------------------------------------------------------------------------


def _update_sizes(cfg: TrainConfig, steps: int) -> list[float]:
    """|w_t - w_{t-1}| / lr per step under a constant random gradient (no weight decay)."""
    rng = np.random.default_rng()
    g = mx.array(rng.normal(size=(64,)).astype(np.float32) + 0.5)
    opt = adamw(cfg)
    params = {"w": mx.array(rng.normal(size=(64,)).astype(np.float32))}
    opt.init(params)
    sizes = []
    for _ in range(steps):
        new = opt.apply_gradients({"w": g}, params)
        sizes.append(float(mx.mean(mx.abs(new["w"] - params["w"])).item()) / cfg.lr)
        params = new
    return sizes


def test_adamw_is_bias_corrected_by_default_and_its_first_steps_are_lr_sized():
    cfg = TrainConfig(lr=1e-3, warmup=1, steps=100, schedule="constant", weight_decay=0.0)
    assert cfg.bias_correction and adamw(cfg).bias_correction
    corrected = _update_sizes(cfg, 10)
    np.testing.assert_allclose(corrected, 1.0, rtol=1e-3)
    # MLX's own default: m and v start at zero and are not corrected, so the first steps are
    # (1 - b1^t) / sqrt(1 - b2^t) times the rate: 3.16x at step 1, 6.5x at step 10.
    raw = _update_sizes(dataclasses.replace(cfg, bias_correction=False), 10)
    expect = [(1 - 0.9**t) / math.sqrt(1 - 0.999**t) for t in range(1, 11)]
    np.testing.assert_allclose(raw, expect, rtol=1e-3)


def test_betas_and_eps_reach_the_optimizer():
    cfg = TrainConfig(betas=[0.8, 0.95], eps=1e-6)
    opt = adamw(cfg)
    assert list(opt.betas) == [0.8, 0.95] and opt.eps == 1e-6


def test_constant_schedule_warms_up_then_holds():
    cfg = TrainConfig(lr=2e-4, warmup=4, steps=50, schedule="constant")
    lrs = [float(schedule(cfg)(mx.array(s)).item()) for s in range(12)]
    # linear from lr / warmup at step 0 toward lr, reached at step `warmup`
    np.testing.assert_allclose(lrs[:4], [5e-5, 8.75e-5, 1.25e-4, 1.625e-4], rtol=1e-5)
    np.testing.assert_allclose(lrs[4:], 2e-4, rtol=1e-6)


def test_a_carried_optimizer_keeps_the_moments_and_restarts_the_schedule():
    rng = np.random.default_rng()
    main_cfg = TrainConfig(lr=1e-2, warmup=2, steps=5)
    opt = adamw(main_cfg)
    params = {"w": mx.array(rng.normal(size=(8,)).astype(np.float32))}
    opt.init(params)
    for _ in range(5):
        params = opt.apply_gradients(
            {"w": mx.array(rng.normal(size=(8,)).astype(np.float32))}, params
        )
    m = np.array(opt.state["w"]["m"])
    refine_cfg = TrainConfig(lr=1e-3, warmup=4, steps=10, schedule="constant")
    carried = carry_optimizer(opt, refine_cfg, offset=5)
    assert int(carried.step.item()) == 5
    np.testing.assert_array_equal(np.array(carried.state["w"]["m"]), m)
    g = mx.array(rng.normal(size=(8,)).astype(np.float32))
    carried.apply_gradients({"w": g}, params)
    # the refinement's warmup starts over: lr / warmup at its first step
    np.testing.assert_allclose(carried.learning_rate.item(), 2.5e-4, rtol=1e-5)
    assert int(carried.step.item()) == 6


def test_bad_optimizer_keys_are_one_line(tmp_path, monkeypatch, capsys):
    for bad, expect in (
        ("train.betas=[0.9]", "train.betas: expected two values"),
        ("train.eps=0", "train.eps: must be > 0"),
        ("train.schedule=linear", "train.schedule"),
        ("refine.optimizer=reuse", "refine.optimizer"),
    ):
        code, _, err = main(
            monkeypatch,
            capsys,
            "run",
            str(QUICKSTART),
            "--set",
            bad,
            "--set",
            f"runs_dir={tmp_path}",
        )
        assert expect in one_line(code, err), err
    assert not list(tmp_path.iterdir())


# -- the invariants --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick():
    """The quickstart recipe's refinement settings, its teacher and 200 held-out problems with
    the teacher's exact match on them."""
    recipe = load_recipe(QUICKSTART, [])
    sub = refine_recipe(recipe)
    teacher, tokenizer, _ = load_model(TEACHER)
    records = read_jsonl(ROOT / recipe.data.test, limit=200)
    check = get_checker(recipe.data.task)
    acc, _ = exact_match(teacher, tokenizer, records, check, max_new_tokens=96, batch_size=100)
    return recipe, sub, tokenizer, records, check, acc


def _accuracy(model, quick) -> float:
    _, _, tokenizer, records, check, _ = quick
    return exact_match(model, tokenizer, records, check, max_new_tokens=96, batch_size=100)[0]


class _Records(TrainCallback):
    def __init__(self):
        self.records = []

    def on_report(self, record, _):
        self.records.append(record)


def _train(model, batches, cfg, loss_cfg, extra=None):
    mx.random.seed(0)
    opt = adamw(cfg)
    opt.init(model.trainable_parameters())
    log = _Records()
    train(model, opt, batches, make_loss(loss_cfg), cfg, extra_losses=extra, callback=log)
    return log.records


def _prompts(recipe, tokenizer, n):
    rows = read_jsonl(ROOT / recipe.data.train, limit=n)
    text = [prompt_text(tokenizer, r["prompt"]) for r in rows]
    return [np.array(tokenizer.encode(t, add_special_tokens=False), np.int32) for t in text]


def _source(model, sub, tokenizer, prompts, batch_size):
    return OnPolicySource(
        model,
        LocalTeacher(TEACHER),
        prompts,
        sub.distill,
        batch_size=batch_size,
        seq_len=sub.data.max_seq_len,
        temperature=sub.loss.temperature,
        eos_ids=sorted(tokenizer.eos_token_ids),
        vocab_size=max(tokenizer.get_vocab().values()) + 1,
        seed=int(np.random.default_rng().integers(1000)),
    )


@pytest.mark.slow
def test_the_teacher_as_student_stays_the_teacher_on_policy(quick):
    recipe, sub, tokenizer, _, _, before = quick
    assert sub.distill.mode == "on_policy" and sub.train.schedule == "constant"
    assert sub.loss.temperature == 1.0 and sub.distill.temperature == 1.0
    student = load_model(TEACHER)[0]
    cfg = dataclasses.replace(sub.train, steps=12, batch_size=16, log_every=1)
    source = _source(student, sub, tokenizer, _prompts(recipe, tokenizer, 96), 16)
    extra = {LOSS_TAG: onpolicy_loss(sub.distill, sub.loss)}
    records = _train(student, source, cfg, sub.loss, extra)
    assert source.counts["on_policy"] == 12
    assert records[0]["loss"] < 1e-4  # the teacher grading its own samples: nothing to learn
    assert max(r["loss"] for r in records) < 0.02
    after = _accuracy(student, quick)
    assert abs(after - before) <= 0.01, (before, after)


@pytest.mark.slow
def test_the_teacher_as_student_stays_the_teacher_offline(quick, tmp_path):
    recipe, sub, tokenizer, _, _, before = quick
    rows = read_jsonl(ROOT / recipe.data.train, limit=96)
    examples, _ = encode_records(tokenizer, rows, max_len=recipe.data.max_seq_len + 1)
    build_token_cache(
        LocalTeacher(TEACHER),
        examples,
        tmp_path / "cache",
        k=recipe.cache.k,
        temperature=recipe.cache.temperature,
        progress=False,
    )
    loader = Loader(open_cache(tmp_path / "cache"), batch_size=16, seq_len=128, seed=0)
    student = load_model(TEACHER)[0]
    cfg = dataclasses.replace(sub.train, steps=12, batch_size=16, log_every=1)
    records = _train(student, loader, cfg, recipe.loss)  # offline refinement: the cache's loss
    loader.close()
    assert records[0]["kd"] < 1e-4
    assert max(r["kd"] for r in records) < 0.01
    after = _accuracy(student, quick)
    assert abs(after - before) <= 0.01, (before, after)


class _Fixed:
    """One batch, over and over (a batch source for `train`)."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.slow
def test_the_onpolicy_loss_of_a_perturbed_student_falls_on_a_fixed_batch(quick):
    recipe, sub, tokenizer, _, _, _ = quick
    student = load_model(TEACHER)[0]
    rng = np.random.default_rng()
    noisy = [
        (k, v + mx.array(rng.normal(scale=0.3, size=v.shape).astype(np.float32)) * mx.abs(v))
        for k, v in _flat(student.parameters())
    ]
    student.load_weights(noisy)
    source = _source(student, sub, tokenizer, _prompts(recipe, tokenizer, 8), 16)
    batch = next(source)  # the perturbed student's own samples, graded by the teacher
    cfg = dataclasses.replace(sub.train, steps=10, batch_size=16, log_every=1)
    extra = {LOSS_TAG: onpolicy_loss(sub.distill, sub.loss)}
    losses = [r["loss"] for r in _train(student, _Fixed(batch), cfg, sub.loss, extra)]
    assert losses[0] > 2e-3, losses  # the perturbation is visible to the loss
    assert losses[-1] < 0.8 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 7, losses


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


# -- the exposure diagnostics ----------------------------------------------------------------


def test_first_departure():
    assert first_departure([1, 2, 3], [1, 2, 3]) is None
    assert first_departure([1, 2, 3], [1, 5, 3]) == 1
    assert first_departure([1, 2], [1, 2, 3]) == 2
    assert first_departure([], [4]) == 0


@pytest.mark.slow
def test_exposure_of_the_teacher_against_itself_is_perfect_and_of_a_cut_student_is_not(quick):
    _, _, tokenizer, records, check, _ = quick
    teacher = load_model(TEACHER)[0]
    _, ref = exact_match(teacher, tokenizer, records[:40], check, max_new_tokens=96, batch_size=40)
    pairs = [(p, g) for _, p, g in ref]
    same = exposure(teacher, teacher, pairs, pairs)
    assert same["agree_teacher_text"] == 1.0 and same["agree_own_text"] == 1.0
    assert same["same"] == 40 and sum(same["departures"]) == 0
    # a student that differs: a departure is counted where its answer leaves the teacher's
    from mlx_distill.models import from_teacher_layers

    _, _, config = load_model(TEACHER)
    cut, _ = from_teacher_layers(teacher, config, 2, layers=[0, 1, 2, 4])
    _, outs = exact_match(cut, tokenizer, records[:40], check, max_new_tokens=96, batch_size=40)
    own = [(p, g) for _, p, g in outs]
    e = exposure(cut, teacher, own, pairs)
    where = [first_departure(o[1], r[1]) for o, r in zip(own, pairs)]
    assert e["same"] == sum(w is None for w in where) < 40
    assert sum(e["departures"]) + e["same"] == 40
    assert 0.0 < e["agree_teacher_text"] < 1.0 and 0.0 < e["agree_own_text"] < 1.0


# -- the refinement phase through the pipeline -----------------------------------------------

REFINE = (
    "eval.num_examples=6",
    "eval.max_new_tokens=12",
    "distill.max_new_tokens=12",
    "refine.steps=2",
    "refine.samples_per_prompt=2",
)


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    runs = tmp_path_factory.mktemp("refine")
    proc = cli(
        "run", str(QUICKSTART), *quickstart_sets(runs, *REFINE), "--jobs", "1", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = tmp_path_factory.mktemp("plain")
    proc2 = cli(
        "run", str(QUICKSTART), *quickstart_sets(plain, *REFINE[:3]), "--jobs", "1",
        "--no-progress",
    )  # fmt: skip
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    return runs / "quickstart", plain / "quickstart"


def _weights(folder):
    return mx.load(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_refinement_exports_both_phases_and_the_first_is_the_plain_run(refined):
    run, plain = refined
    for role in ("student", "baseline"):
        before, after = _weights(run / f"{role}-before-refine"), _weights(run / role)
        plain_w = _weights(plain / role)
        for key, value in plain_w.items():  # phase one is exactly the run without refinement
            np.testing.assert_array_equal(np.array(before[key]), np.array(value), err_msg=key)
        assert any(not np.array_equal(np.array(after[k]), np.array(v)) for k, v in before.items())
    distill, baseline = (
        json.loads((run / stage / "stage.json").read_text())["result"]
        for stage in ("distill", "baseline")
    )
    assert distill["refine"]["mode"] == "on_policy" and distill["refine"]["on_policy_batches"] == 2
    assert distill["refine"]["lr"] == pytest.approx(load_recipe(QUICKSTART, []).train.lr / 30)
    assert baseline["refine"]["mode"] == "hard labels" and baseline["refine"]["steps"] == 2


@pytest.mark.slow
def test_refinement_is_logged_evaluated_and_reported(refined):
    run, _ = refined
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for name in ("distill-refine", "baseline-refine"):
        steps = [r["step"] for r in records if r["run"] == name and "loss" in r]
        assert steps == [1, 2], name
    results = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert {"student-before-refine", "baseline-before-refine"} <= set(results)
    for role in ("student", "baseline", "student-before-refine", "baseline-before-refine"):
        e = results[role]["exposure"]
        assert 0.0 <= e["agree_teacher_text"] <= 1.0 and 0.0 <= e["agree_own_text"] <= 1.0
        assert e["same"] + sum(e["departures"]) == 6
    assert "exposure" not in results["teacher"]
    report = (run / "report.md").read_text()
    assert "## Refinement" in report and "## Where the students leave the teacher" in report
    assert "| KD student before refinement |" in report


def test_bad_refine_keys_are_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    for bad, expect in (
        (("refine.steps=2", "refine.samples_per_prompt=3"), "refine.samples_per_prompt"),
        (("refine.steps=2", "refine.lr=0"), "refine.lr: must be > 0"),
        (("refine.steps=-1",), "refine.steps"),
        (
            (
                "refine.steps=2",
                "refine.mode=mixed",
                "distill.mode=on_policy",
                "stages=[tokenizer,teacher,distill]",
            ),
            "refine.mode: mixed trains on the teacher cache",
        ),
    ):
        args = quickstart_sets(tmp_path, *bad)
        code, _, err = main(monkeypatch, capsys, "run", str(QUICKSTART), *args)
        assert expect in one_line(code, err), err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_run_killed_during_refinement_resumes_it_to_the_same_student(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    extra = (
        *REFINE[:3],
        "refine.steps=6",
        "refine.samples_per_prompt=2",
        "train.checkpoint_every=1",
    )
    whole = cli(
        "run", str(QUICKSTART), *quickstart_sets(tmp_path / "whole", *extra), "--jobs", "1",
        "--no-progress", "--stage", "tokenizer", "--stage", "teacher", "--stage", "cache",
        "--stage", "distill",
    )  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]
    args = [sys.executable, "-m", "mlx_distill", "run", str(QUICKSTART)]
    args += quickstart_sets(tmp_path / "killed", *extra) + ["--jobs", "1", "--no-progress"]
    args += ["--stage", "tokenizer", "--stage", "teacher", "--stage", "cache", "--stage", "distill"]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "quickstart" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        steps = [json.loads(x).get("step", 0) for x in lines if '"distill-refine"' in x]
        if steps and max(steps) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed in its refinement"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = cli(*args[3:], "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    run = tmp_path / "killed" / "quickstart"
    refine = json.loads((run / "distill" / "stage.json").read_text())["result"]["refine"]
    assert refine["resumed_from"] >= 2
    for folder in ("student", "student-before-refine"):
        a, b = _weights(tmp_path / "whole" / "quickstart" / folder), _weights(run / folder)
        for key, value in a.items():
            np.testing.assert_array_equal(np.array(b[key]), np.array(value), err_msg=key)
