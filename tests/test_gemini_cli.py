"""The Gemini teacher through `mlx-distill` (subprocesses) against the loopback fake.

Each scenario counts the fake's requests per prompt before and after, so "nothing is asked
twice" is asserted on what the server saw, not on what the client believes it did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_gemini import FakeGemini, fake_answer

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
MODEL = "gemini-2.5-flash"


def prompts(n: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [f"What is {i} plus {i}?" for i in range(n)] + list(extra)


def write_recipe(tmp: Path, fake: FakeGemini, items: list[str], **teacher) -> Path:
    """A tiny Gemini -> scratch-student recipe: SentencePiece tokenizer, 1-layer student."""
    lines = []
    for p in items:
        thought, answer = fake_answer(MODEL, p)
        lines.append(json.dumps({"prompt": p, "completion": f"{thought} {answer}"}))
    (tmp / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    gemini = {
        "model": MODEL,
        "base_url": fake.base_url,
        "max_in_flight": 1,
        "rpm": 0,
        "max_retries": 1,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.02,
        "timeout_s": 20,
        **teacher.pop("gemini", {}),
    }
    recipe = {
        "name": "g",
        "runs_dir": str(tmp / "runs"),
        "stages": ["tokenizer", "teacher", "cache", "distill"],
        "data": {"train": str(tmp / "prompts.jsonl"), "max_seq_len": 96},
        "tokenizer": {"vocab_size": 90},
        "teacher": {"kind": "gemini", "gemini": gemini, **teacher},
        "student": {"model": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64}},
        "loss": {"kind": "forward_kl", "kd_weight": 0.5},
        "train": {"steps": 1, "batch_size": 4, "log_every": 1, "warmup": 1},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(*args, check: int | None = 0, wait: bool = True):
    env = dict(os.environ, GEMINI_API_KEY=KEY, NO_PROXY="127.0.0.1,localhost")
    env.pop("GOOGLE_API_KEY", None)
    cmd = [sys.executable, "-m", "mlx_distill", *args, "--no-progress"]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check is not None:
        assert proc.returncode == check, proc.stderr[-3000:]
    return proc


def stage(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "runs" / "g" / name / "stage.json").read_text())


def stored_lines(tmp: Path) -> list[dict]:
    out = []
    for shard in sorted((tmp / "runs/g/teacher/records").glob("records-*.jsonl")):
        out += [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
    return out


@pytest.mark.slow
def test_max_cost_stop_is_partial_refused_downstream_then_continued(tmp_path):
    items = prompts(8)
    with FakeGemini(key=KEY) as fake:
        recipe = str(write_recipe(tmp_path, fake, items))
        # One fake answer costs ~5.4e-5 USD: the cap stops the run after a few.
        first = cli("teach", recipe, "--set", "teacher.gemini.max_cost=0.00015", check=3)
        assert "capped by max_cost" in first.stderr.split("\n[teacher]")[0] + first.stderr
        assert "teacher incomplete" in first.stderr and "max_cost" in first.stderr
        asked_first = dict(fake.answered)
        assert 0 < sum(asked_first.values()) < len(items)
        info = stage(tmp_path, "teacher")
        assert info["status"] == "incomplete"
        spent_first = sum(r["cost_usd"] for r in stored_lines(tmp_path))
        # Downstream refuses the partial teach (exit 2, saying why) ...
        refused = cli("train", recipe, "--set", "teacher.gemini.max_cost=0.00015", check=2)
        assert "teacher incomplete" in refused.stderr and "mlx-distill teach" in refused.stderr
        refused = cli("run", recipe, "--stage", "cache", check=2)
        assert "did not finish" in refused.stderr and "not asked" in refused.stderr
        # ... unless the recipe allows it: then the cache says how many prompts it used.
        cli(
            "run",
            recipe,
            "--set",
            "teacher.gemini.max_cost=0.00015",
            "--set",
            "teacher.allow_partial=true",
        )
        assert dict(fake.answered) == asked_first  # nothing asked again, nothing new past the cap
        cache = stage(tmp_path, "cache")["result"]
        assert cache["partial"] and cache["prompts"] == len(items)
        assert cache["prompts_used"] == sum(asked_first.values())
        used = f"Teacher data: {cache['prompts_used']} of {len(items)} prompts used"
        assert (
            cache["report"].startswith(used)
            and "allowed by teacher.allow_partial" in cache["report"]
        )
        # Raising the cap continues: only the rest is asked, and the tally carries over.
        cli("teach", recipe, "--set", "teacher.gemini.max_cost=1.0")
        assert sum(fake.answered.values()) == len(items)
        assert max(fake.answered.values()) == 1  # 0 re-asks
        result = stage(tmp_path, "teacher")["result"]
        assert result["complete"] and result["answered"] == len(items)
        assert result["total_cost_usd"] == pytest.approx(spent_first + result["cost_usd"])
        assert result["cost_usd"] < result["total_cost_usd"]
        assert stage(tmp_path, "cache")["result"]["prompts_used"] == len(items)
        # Up to date now: nothing runs, nothing is asked.
        again = cli("teach", recipe, "--set", "teacher.gemini.max_cost=1.0")
        assert "[teacher] up to date" in again.stderr
        assert sum(fake.answered.values()) == len(items)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the condition never came"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_change_rpm_after_a_kill_asks_nothing_again(tmp_path):
    items = prompts(10)
    with FakeGemini(key=KEY, latency_s=0.05) as fake:
        recipe = str(write_recipe(tmp_path, fake, items))
        proc = cli("teach", recipe, wait=False)
        _kill_when(proc, lambda: len(stored_lines(tmp_path)) >= 3)
        stored = {r["prompt"] for r in stored_lines(tmp_path) if r["status"] == "ok"}
        before = sum(fake.answered.values())
        cli(
            "teach",
            recipe,
            "--set",
            "teacher.gemini.rpm=6000",
            "--set",
            "teacher.gemini.timeout_s=9",
        )
        assert stage(tmp_path, "teacher")["result"]["complete"]
        for p in stored:
            assert fake.answered[p] == 1  # stored before the kill: never asked again
        # At most the one request in flight at the kill is asked twice (it was never stored).
        assert sum(fake.answered.values()) - len(items) <= 1
        assert before >= len(stored) and sum(fake.answered.values()) >= len(items)


@pytest.mark.slow
def test_retry_failed_asks_exactly_the_failed_prompts(tmp_path):
    items = prompts(4, ("Flaky one? [500x3]", "Bad one? [400]"))
    with FakeGemini(key=KEY) as fake:
        recipe = str(write_recipe(tmp_path, fake, items))
        cli("teach", recipe)  # failed prompts do not make a teach partial
        result = stage(tmp_path, "teacher")["result"]
        assert result["complete"] and result["failed_prompts"] == 2
        attempts = dict(fake.attempts)
        assert attempts["Flaky one? [500x3]"] == 2  # max_retries=1: two tries, then failed
        cli("teach", recipe)  # up to date: asks nothing
        assert dict(fake.attempts) == attempts
        rows_before = stage(tmp_path, "cache")["result"]["rows"]
        out = cli("teach", recipe, "--retry-failed")
        assert "[teacher] --retry-failed" in out.stderr and "[cache] --retry" not in out.stderr
        asked = {p: n - attempts.get(p, 0) for p, n in fake.attempts.items()}
        assert {p for p, n in asked.items() if n} == {"Flaky one? [500x3]", "Bad one? [400]"}
        assert fake.answered["Flaky one? [500x3]"] == 1
        assert all(fake.answered[p] == 1 for p in prompts(4))  # answered ones: never again
        result = stage(tmp_path, "teacher")["result"]
        assert result["failed_prompts"] == 1 and result["answered"] == 5
        # The new answer reached the cache (its stage reran on the teacher's new content).
        assert stage(tmp_path, "cache")["result"]["rows"] == rows_before + 1


@pytest.mark.slow
def test_kill_right_after_the_logprobs_refusal_does_not_meet_it_again(tmp_path):
    items = prompts(6)
    with FakeGemini(key=KEY, refuse_logprobs=True, latency_s=0.1) as fake:
        recipe = str(write_recipe(tmp_path, fake, items, gemini={"logprobs": 5}))
        manifest = tmp_path / "runs/g/teacher/records/manifest.json"
        proc = cli("teach", recipe, wait=False)
        _kill_when(proc, lambda: manifest.exists() and "Logprobs is not" in manifest.read_text())
        seen = len(fake.requests)
        cli("teach", recipe)
        later = [r for r in fake.requests[seen:] if "generateContent" in r["path"]]
        assert later and not any(
            r["body"].get("generationConfig", {}).get("responseLogprobs") for r in later
        )
        bodies = [r["body"].get("generationConfig", {}) for r in fake.requests]
        lp_requests = [b for b in bodies if b.get("responseLogprobs")]
        assert len(lp_requests) == 1  # the refusal was met once, in the killed run


def test_gemini_logprob_targets_reach_distill_loss(tmp_path):
    import mlx.core as mx
    from kd_reference import reference

    from mlx_distill.cache import open_cache
    from mlx_distill.context import Context
    from mlx_distill.models import hidden_states, lm_head_weight
    from mlx_distill.recipe import load_recipe
    from mlx_distill.stages.distill import student as _student
    from mlx_distill.stages.gemini import prompt_keys
    from mlx_distill.stages.inputs import loader as _loader
    from mlx_distill.stages.inputs import tokenizer as _tokenizer
    from mlx_distill.stages.kinds import teacher_kind
    from mlx_distill.teachers.align import records_to_examples
    from mlx_distill.teachers.gemini_cache import target_k

    items = prompts(6)
    with FakeGemini(key=KEY) as fake:
        recipe_path = write_recipe(tmp_path, fake, items, gemini={"logprobs": 4})
        cli("run", str(recipe_path))
    run_dir = tmp_path / "runs/g"
    coverage = stage(tmp_path, "cache")["result"]["coverage"]
    assert coverage["with_logprobs"] == len(items)
    assert 0.3 < coverage["position_fraction"] <= 1 and 0 < coverage["mass_fraction"] < 1
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step1 = next(m for m in logged if m.get("run") == "distill" and m.get("step") == 1)
    assert step1["kd"] > 0 and 0 < step1["covered_mass"] < 1

    # The same first batch and the same initial student, by hand.
    recipe = load_recipe(run_dir / "recipe.yaml")
    ctx = Context(recipe, run_dir, progress=False)
    tokenizer = _tokenizer(ctx)
    expect = teacher_kind("gemini").cache_expect(ctx, tokenizer)
    loader = _loader(ctx, open_cache(run_dir / "cache", expect=expect), 96, 4)
    batch = next(loader)
    loader.close()
    model, _ = _student(ctx, tokenizer)
    h = np.array(hidden_states(model, batch.tokens).astype(mx.float32)).reshape(-1, 32)
    W = np.array(lm_head_weight(model).astype(mx.float32))
    labels = np.array(batch.labels).reshape(-1)
    mask = np.array(batch.mask).reshape(-1)
    ids = np.array(batch.targets.ids).reshape(len(labels), -1)
    lps = np.array(batch.targets.logprobs).reshape(len(labels), -1)
    kw = dict(kind="forward_kl", T=1.0, tail="bucket", kd_weight=0.5, grads=False)
    _, cached, _, _ = reference(h, W, ("sparse", ids, lps), labels=labels, mask=mask, **kw)
    assert step1["kd"] == pytest.approx(cached["kd"], rel=1e-4)
    assert step1["ce"] == pytest.approx(cached["ce"], rel=1e-4)

    # ... and on the aligned targets themselves (before the cache's 8-bit log-prob codes).
    examples, targets, _ = records_to_examples(
        run_dir / "teacher/records",
        tokenizer,
        keys=prompt_keys(ctx),
        k=target_k(ctx.recipe.teacher.gemini),
    )
    tokens = np.array(batch.tokens)
    B, L = tokens.shape
    K = target_k(ctx.recipe.teacher.gemini)
    raw_ids = np.zeros((B, L, K), np.int32)
    raw_lps = np.full((B, L, K), -np.inf, np.float32)
    raw_ids[:, :, 0], raw_lps[:, :, 0] = labels.reshape(B, L), 0.0  # uncovered: the label
    for b in range(B):
        t_ids, t_lps = next(
            t
            for ex, t in zip(examples, targets)
            if np.array_equal(ex.tokens[:L], tokens[b, : min(L, len(ex.tokens))])
            and not tokens[b, len(ex.tokens) :].any()
        )
        covered = np.isfinite(t_lps[:L]).any(axis=1)
        raw_ids[b, : len(covered)][covered] = t_ids[:L][covered]
        raw_lps[b, : len(covered)][covered] = t_lps[:L][covered]
    _, direct, _, _ = reference(
        h, W, ("sparse", raw_ids.reshape(B * L, -1), raw_lps.reshape(B * L, -1)),
        labels=labels, mask=mask, **kw,
    )  # fmt: skip
    assert step1["kd"] == pytest.approx(direct["kd"], rel=2e-2)
    assert direct["covered_mass"] == pytest.approx(step1["covered_mass"], abs=2e-2)
