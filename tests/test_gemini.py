"""Gemini teacher against the loopback fake, through the real google-genai SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_gemini import FakeGemini
from tiny import GEMINI_KEY, ROOT, gemini_overrides, gemini_recipe

from mlx_distill.cache.records import read_records, records_info, records_verify
from mlx_distill.errors import BadInput
from mlx_distill.recipe import load_recipe
from mlx_distill.teachers.base import Teacher
from mlx_distill.teachers.gemini import GeminiTeacher, run_gemini_teacher
from mlx_distill.teachers.limits import Limiter, server_retry_delay

pytestmark = pytest.mark.usefixtures("gemini_env")  # conftest.py: GEMINI_API_KEY=GEMINI_KEY


def ok_lines(out: Path) -> Counter:
    """key -> number of 'ok' rows on disk (must never exceed 1)."""
    counts: Counter = Counter()
    for shard in sorted(out.glob("records-*.jsonl")):
        for line in shard.read_text().splitlines():
            row = json.loads(line)
            counts[row["key"]] += row["status"] == "ok"
    return counts


FAULTY = {
    "Add 17 and 25. [429x2]": "ok",
    "Is 91 prime? [500x1]": "ok",
    "Sort 3, 1, 2. [503x2]": "ok",
    "Halve 64. [html500x1]": "ok",
    "Double 21. [hangx1]": "ok",
    "Square 12. [malformedx1]": "ok",
    "Cube 3. [dropx1]": "ok",
    "Count the vowels in banana. [maxtokens]": "MAX_TOKENS without an answer",
    "Explain a bad thing. [safety]": "finish reason SAFETY",
    "Something blocked. [blocked]": "prompt blocked: SAFETY",
    "A bad request. [400]": "400 INVALID_ARGUMENT",
    "Always overloaded. [503x99]": "gave up after 4 attempts",
}


def test_faults_end_to_end_each_prompt_once(tmp_path):
    plain = [f"What is {i} times {i + 3}?" for i in range(8)]
    prompts = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(list(FAULTY) + plain)]
    prompts.append({"id": "dup", "prompt": plain[0]})  # identical prompt: asked once
    out = tmp_path / "records"
    with FakeGemini(key=GEMINI_KEY, retry_delay="0.3s", hang_s=2.5) as fake:
        summary = run_gemini_teacher(gemini_recipe(fake), prompts, out, progress=False)
    expect_ok = sum(v == "ok" for v in FAULTY.values()) + len(plain)
    assert summary["unique"] == len(FAULTY) + len(plain)
    assert (summary["done"], summary["failed"], summary["skipped"]) == (expect_ok, 5, 0)
    records = {r["prompt"]: r for r in read_records(out)}
    assert len(records) == summary["unique"]
    for prompt, want in list(FAULTY.items()) + [(p, "ok") for p in plain]:
        record = records[prompt]
        if want == "ok":
            assert record["status"] == "ok" and record["text"], prompt
            assert fake.answered[prompt] == 1  # answered by the server exactly once
        else:
            assert record["status"] == "failed" and want in record["error"], (prompt, record)
    assert max(ok_lines(out).values()) == 1
    # Attempts: the fault count plus one, and no retry at all for non-retryable answers.
    assert fake.attempts["Add 17 and 25. [429x2]"] == 3
    assert fake.attempts["Always overloaded. [503x99]"] == 4
    assert fake.attempts["A bad request. [400]"] == 1
    assert fake.attempts["Explain a bad thing. [safety]"] == 1
    # RetryInfo.retryDelay (0.3 s) is honoured, not the 0.01-0.05 s backoff.
    times = [r["t"] for r in fake.requests if "[429x2]" in json.dumps(r["body"])]
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.3
    # Thought summaries are stored apart from the answer; usage adds up to the manifest tally.
    ok = records["What is 0 times 3?"]
    assert ok["thoughts"].startswith("Reading the question") and "Reading" not in ok["text"]
    info = records_info(out)
    rows = [json.loads(x) for s in out.glob("records-*.jsonl") for x in s.read_text().splitlines()]
    assert info["usage"]["thoughts"] == sum(r["usage"]["thoughts"] for r in rows) > 0
    assert info["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows), abs=1e-6)
    assert info["cost_usd"] > 0 and info["ok"] == expect_ok and info["failed"] == 5
    assert records_verify(out)["answered"] == expect_ok
    # The key went over the wire as a header but never onto disk.
    for file in out.rglob("*"):
        if file.is_file():
            assert GEMINI_KEY not in file.read_text(errors="replace"), file
    # v1beta is pinned by default; thinking options reach the wire.
    assert all(r["path"].startswith("/v1beta/models/gemini-2.5-flash:") for r in fake.requests)
    assert fake.requests[0]["body"]["generationConfig"]["thinkingConfig"] == {
        "include_thoughts": True
    }


def test_rerun_skips_and_retry_failed(tmp_path):
    prompts = [{"prompt": "Name a color."}, {"prompt": "Broken. [400]"}]
    out = tmp_path / "records"
    with FakeGemini(key=GEMINI_KEY) as fake:
        first = run_gemini_teacher(gemini_recipe(fake), prompts, out, progress=False)
        calls = sum(fake.attempts.values())
        again = run_gemini_teacher(gemini_recipe(fake), prompts, out, progress=False)
        assert sum(fake.attempts.values()) == calls  # nothing asked twice
        retried = run_gemini_teacher(
            gemini_recipe(fake), prompts, out, retry_failed=True, progress=False
        )
    assert (first["done"], first["failed"]) == (1, 1)
    assert (again["done"], again["failed"], again["skipped"]) == (0, 0, 2)
    assert (retried["done"], retried["failed"], retried["skipped"]) == (0, 1, 1)
    assert fake.attempts["Broken. [400]"] == 2 and fake.attempts["Name a color."] == 1
    assert records_info(out)["rows"] == 3  # the retried failure appended, the answer not


def test_missing_key_and_bad_prompts(tmp_path, monkeypatch):
    with FakeGemini(key=GEMINI_KEY) as fake:
        r = gemini_recipe(fake)
        with pytest.raises(BadInput, match="prompt 1: expected an object"):
            run_gemini_teacher(r, [{"prompt": "a"}, {"text": "b"}], tmp_path / "a")
        monkeypatch.delenv("GEMINI_API_KEY")
        with pytest.raises(BadInput, match=r"set GEMINI_API_KEY \(or GOOGLE_API_KEY\)"):
            run_gemini_teacher(r, [{"prompt": "a"}], tmp_path / "b")
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_run_wide_errors_stop_with_a_fix(tmp_path):
    prompts = [{"prompt": f"Q{i}?"} for i in range(5)]
    with FakeGemini(key="a-different-key") as fake:
        with pytest.raises(BadInput, match="rejected the API key: check GEMINI_API_KEY") as e:
            run_gemini_teacher(gemini_recipe(fake), prompts, tmp_path / "a", progress=False)
    assert GEMINI_KEY not in str(e.value)
    with FakeGemini(key=GEMINI_KEY) as fake:
        with pytest.raises(BadInput, match="does not know model no-such-model on API v1beta"):
            run_gemini_teacher(gemini_recipe(fake, model="no-such-model"), prompts, tmp_path / "b")
    # Not one failed record per prompt: the run stopped, and a fixed rerun asks them all.
    assert records_info(tmp_path / "a")["rows"] == records_info(tmp_path / "b")["rows"] == 0


def test_logprobs_400_detected_once_then_text_only(tmp_path, capsys):
    prompts = [{"prompt": f"Question {i}?"} for i in range(6)]
    out = tmp_path / "records"
    with FakeGemini(key=GEMINI_KEY, refuse_logprobs=True) as fake:
        summary = run_gemini_teacher(
            gemini_recipe(fake, logprobs=5, max_in_flight=1), prompts, out, progress=True
        )
        asked = [r for r in fake.requests if "generateContent" in r["path"]]
        with_lp = [r for r in asked if r["body"]["generationConfig"].get("responseLogprobs")]
        assert len(with_lp) == 1 and len(asked) == 7
        more = [{"prompt": f"Another {i}?"} for i in range(2)]
        run_gemini_teacher(gemini_recipe(fake, logprobs=5), more, out, progress=False)
        later = [r for r in fake.requests if "generateContent" in r["path"]][7:]
        assert len(later) == 2 and not any(
            r["body"]["generationConfig"].get("responseLogprobs") for r in later
        )
    assert summary["done"] == 6 and summary["failed"] == 0
    assert "Logprobs is not enabled" in summary["logprobs_disabled"]
    err = capsys.readouterr().err
    assert err.count("log-probs refused") == 1
    # The estimate comes first; the progress bar shows done/failed/in-flight, tokens and cost.
    assert err.startswith("gemini teacher: 6 prompts to ask (0 already answered)")
    assert "cost at most $" in err and "6/6" in err and "in_flight=0" in err and "cost=$" in err
    assert all(r["tokens"] is None and r["logprobs"] == 0 for r in read_records(out))


def test_logprobs_captured_when_served(tmp_path):
    teacher_prompts = ["Say it. [ans=Four apples.]"]
    with FakeGemini(key=GEMINI_KEY) as fake:
        r = gemini_recipe(fake, logprobs=4)
        teacher = GeminiTeacher(r.teacher.gemini)
        assert isinstance(teacher, Teacher) and teacher.id == "gemini/gemini-2.5-flash"
        (completion,) = teacher.generate(teacher_prompts)
    assert completion.ok and completion.text == "Four apples."
    assert [t.token for t in completion.tokens] == ["Four", " apples", "."]
    first = completion.tokens[0]
    assert len(first.candidates) == 4 and first.candidates[0][0] == "Four"
    lps = [lp for _, lp in first.candidates]
    assert lps == sorted(lps, reverse=True) and first.logprob == lps[0]


def test_max_cost_stops_cleanly(tmp_path):
    prompts = [{"prompt": f"Problem number {i}."} for i in range(20)]
    out = tmp_path / "records"
    with FakeGemini(key=GEMINI_KEY) as fake:
        probe = run_gemini_teacher(
            gemini_recipe(fake), prompts[:1], tmp_path / "probe", progress=False
        )
        unit = probe["cost_usd"]  # every answer of the fake costs the same here
        limit = 3.5 * unit
        summary = run_gemini_teacher(
            gemini_recipe(fake, max_in_flight=1, max_cost=limit), prompts, out, progress=False
        )
    assert unit > 0
    assert summary["stopped"] == "max_cost"
    assert summary["done"] == 4 and summary["not_asked"] == 16
    assert summary["total_cost_usd"] == pytest.approx(4 * unit, rel=1e-3)


def test_api_version_v1_and_env_base_url(tmp_path, monkeypatch):
    with FakeGemini(key=GEMINI_KEY) as fake:
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", fake.base_url)
        r = load_recipe(None, ["teacher.kind=gemini", "teacher.gemini.api_version=v1"])
        (c,) = GeminiTeacher(r.teacher.gemini).generate(["Hi there."])
    assert c.ok and fake.requests[0]["path"] == "/v1/models/gemini-2.5-flash:generateContent"
    assert fake.requests[0]["headers"]["X-Server-Timeout"] == "300"


def test_limiter_rpm_tpm_and_retry_delay():
    now = [0.0]
    limiter = Limiter(rpm=120, tpm=600, clock=lambda: now[0])  # 2 req/s, 10 tokens/s
    assert limiter.delay() == 0.0
    limiter.requests.level -= 1  # what acquire() debits
    limiter.tokens.level -= 40  # an estimate of 40 tokens on a 10-token bucket
    assert limiter.delay() == pytest.approx(3.1)  # tokens back to > 0 (1.0) after 3.1 s
    limiter.settle(40, 10)  # real usage was smaller: refund 30, level back to 0
    assert limiter.delay() == pytest.approx(0.1)
    now[0] += 0.1
    assert limiter.delay() == pytest.approx(0.0)
    limiter.pause(5.0)
    assert limiter.delay() == pytest.approx(5.0)
    body = {"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                   "retryDelay": "47s"}]}}  # fmt: skip
    assert server_retry_delay(body) == 47.0
    assert server_retry_delay({"error": {"details": []}}) is None


_CHILD = """
import json, sys
from pathlib import Path
from mlx_distill.recipe import load_recipe
from mlx_distill.teachers.base import Teacher
from mlx_distill.teachers.gemini import run_gemini_teacher
prompts = [json.loads(x) for x in Path(sys.argv[1]).read_text().splitlines()]
run_gemini_teacher(load_recipe(None, sys.argv[3:]), prompts, Path(sys.argv[2]), progress=False)
"""


def test_kill_and_resume_no_loss_no_duplicates(tmp_path):
    prompts = [{"id": f"k{i}", "prompt": f"Kill test prompt {i}."} for i in range(60)]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps(p) for p in prompts))
    out = tmp_path / "records"
    with FakeGemini(key=GEMINI_KEY, latency_s=0.05) as fake:
        args = gemini_overrides(fake, max_in_flight=3)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(src), str(out), *args], env=env, cwd=ROOT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            shard = out / "records-00000.jsonl"
            if shard.exists() and shard.read_bytes().count(b"\n") >= 15:
                break
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        durable = {r["prompt"] for r in read_records(out) if r["status"] == "ok"}
        assert 15 <= len(durable) < 60, "the kill must land mid-run"
        summary = run_gemini_teacher(gemini_recipe(fake), prompts, out, progress=False)
    assert summary["skipped"] == len(durable) and summary["done"] == 60 - len(durable)
    for prompt in durable:
        assert fake.answered[prompt] == 1, prompt  # durable before the kill: never asked again
    counts = ok_lines(out)
    assert len(counts) == 60 and set(counts.values()) == {1}  # none lost, none twice
    assert records_verify(out)["answered"] == 60


def test_bench_teacher_reports_each_level():
    from mlx_distill.teachers.bench import bench_teacher

    report = bench_teacher(requests=12, levels=(1, 4))
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        assert lv["failed"] == 0 and lv["requests"] == 12
        assert lv["requests_per_s"] == pytest.approx(12 / lv["seconds"], rel=0.02)
        assert 0 < lv["client_cpu_ms_per_request"] < 1000 * lv["seconds"] / 12 * 2
    assert (
        GEMINI_KEY not in json.dumps(report) and os.environ["GEMINI_API_KEY"] == GEMINI_KEY
    )  # restored


def test_shipped_recipe_and_prompt_set_load():
    r = load_recipe(ROOT / "recipes" / "gemini_to_qwen2.5-0.5b_seqkd.yaml")
    g = r.teacher.gemini
    assert r.teacher.kind == "gemini" and g.model == "gemini-2.5-flash"
    assert g.api_version == "v1beta" and g.include_thoughts and g.max_cost == 2.0
    rows = [json.loads(x) for x in (ROOT / r.data.train).read_text().splitlines()]
    held = [json.loads(x) for x in (ROOT / r.data.test).read_text().splitlines()]
    assert len(rows) == 200 and len(held) == 40
    assert len({x["prompt"] for x in rows + held}) == 240  # no duplicates, no leakage
    assert all(x["prompt"].strip() and x["answer"].strip() for x in rows + held)
    assert all(x["completion"] == f"Answer: {x['answer']}" for x in rows + held)
    from mlx_distill.text.data import read_jsonl  # the pipeline's reader accepts the set

    assert len(read_jsonl(ROOT / r.data.train)) == 200
    assert len({x["category"] for x in rows}) >= 10
