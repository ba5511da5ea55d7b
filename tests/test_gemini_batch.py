"""Batch mode against the fake's Batch API: round trip, resume without paying twice, failures."""

from __future__ import annotations

import pytest
from fake_gemini import FakeGemini
from tiny import GEMINI_KEY, gemini_recipe

from mlx_distill.cache.records import read_records, records_info
from mlx_distill.teachers import batch
from mlx_distill.teachers.gemini import run_gemini_teacher

pytestmark = pytest.mark.usefixtures("gemini_env")  # conftest.py: GEMINI_API_KEY=GEMINI_KEY

PROMPTS = [{"id": f"b{i}", "prompt": f"Batch question {i}?"} for i in range(4)]
PROMPTS.append({"id": "bad", "prompt": "Batch bad one. [400]"})


def brecipe(fake, **kw):
    return gemini_recipe(fake, batch=True, poll_interval_s=0.01, **kw)


@pytest.mark.parametrize("output", ["inline", "file"])
def test_batch_round_trip_half_price(tmp_path, output):
    with FakeGemini(key=GEMINI_KEY, batch_output=output) as fake:
        summary = run_gemini_teacher(
            brecipe(fake, logprobs=3), PROMPTS, tmp_path / "b", progress=False
        )
        run_gemini_teacher(
            gemini_recipe(fake, logprobs=3), PROMPTS[:1], tmp_path / "o", progress=False
        )
        again = run_gemini_teacher(
            brecipe(fake, logprobs=3), PROMPTS, tmp_path / "b", progress=False
        )
    assert (summary["done"], summary["failed"]) == (4, 1)
    assert summary["failures"] == {"400: Invalid request.": 1}
    assert len(fake.batches) == 1 and again["skipped"] == 5  # the rerun submits nothing
    records = {r["id"]: r for r in read_records(tmp_path / "b")}
    first = records["b0"]
    assert first["source"] == "batch" and first["text"].startswith("The answer is")
    assert first["thoughts"] and first["tokens"][0][0] == "The"
    online_first = read_records(tmp_path / "o")[0]
    assert first["text"] == online_first["text"]
    assert first["cost_usd"] == pytest.approx(online_first["cost_usd"] / 2)  # Batch API: 50%
    jobs = records_info(tmp_path / "b")["batch_jobs"]
    assert [(j["name"], j["state"], j["ingested"]) for j in jobs] == [
        ("batches/job1", "SUCCEEDED", True)
    ]


class Interrupted(Exception):
    pass


def test_batch_resume_polls_instead_of_resubmitting(tmp_path, monkeypatch):
    out = tmp_path / "b"

    def crash(_seconds):
        raise Interrupted

    with FakeGemini(key=GEMINI_KEY) as fake:
        with monkeypatch.context() as m, pytest.raises(Interrupted):
            m.setattr(batch.time, "sleep", crash)  # dies at its first poll wait
            run_gemini_teacher(brecipe(fake), PROMPTS, out, progress=False)
        assert records_info(out)["batch_jobs"][0]["name"] == "batches/job1"
        summary = run_gemini_teacher(brecipe(fake), PROMPTS, out, progress=False)
    assert len(fake.batches) == 1  # polled the job it had, paid once
    assert (summary["done"], summary["failed"]) == (4, 1)


def test_batch_found_by_display_name_after_crash_before_name_saved(tmp_path, monkeypatch):
    out = tmp_path / "b"
    real = batch._set_job
    calls = []

    def flaky(store, job):
        calls.append(job["state"])
        if len(calls) == 2:  # the write that would store the new job's name
            raise Interrupted
        real(store, job)

    with FakeGemini(key=GEMINI_KEY) as fake:
        with monkeypatch.context() as m, pytest.raises(Interrupted):
            m.setattr(batch, "_set_job", flaky)
            run_gemini_teacher(brecipe(fake), PROMPTS, out, progress=False)
        assert records_info(out)["batch_jobs"][0]["name"] is None
        summary = run_gemini_teacher(brecipe(fake), PROMPTS, out, progress=False)
    assert len(fake.batches) == 1 and summary["done"] == 4
    assert any(r["path"] == "/v1beta/batches" for r in fake.requests)  # looked it up


def test_batch_expired_and_logprobs_refused(tmp_path):
    with FakeGemini(key=GEMINI_KEY, batch_final_state="BATCH_STATE_EXPIRED") as fake:
        expired = run_gemini_teacher(brecipe(fake), PROMPTS[:2], tmp_path / "e", progress=False)
    assert expired["failed"] == 2 and "batches/job1 EXPIRED" in next(iter(expired["failures"]))
    with FakeGemini(key=GEMINI_KEY, refuse_logprobs=True) as fake:
        s = run_gemini_teacher(
            brecipe(fake, logprobs=5), PROMPTS[:3], tmp_path / "l", progress=False
        )
        bodies = [r["body"] for r in fake.requests if r["path"].endswith(":batchGenerateContent")]
    assert len(bodies) == 2 and s["done"] == 3 and "Logprobs" in s["logprobs_disabled"]
    gen = [b["batch"]["inputConfig"]["requests"]["requests"][0]["request"]["generationConfig"]
           for b in bodies]  # fmt: skip
    assert gen[0]["responseLogprobs"] is True and "responseLogprobs" not in gen[1]


def test_batch_transient_item_errors_are_resubmitted(tmp_path):
    prompts = [
        {"prompt": "Batch fine?"},
        {"prompt": "Batch busy. [503x1]"},
        {"prompt": "Batch quota. [429x2]"},
        {"prompt": "Batch down. [500]"},  # always fails: stored as failed after the retries
    ]
    with FakeGemini(key=GEMINI_KEY) as fake:
        summary = run_gemini_teacher(
            brecipe(fake, max_retries=2, backoff_base_s=0.0),
            prompts,
            tmp_path / "b",
            progress=False,
        )
    records = {r["prompt"]: r for r in read_records(tmp_path / "b")}
    assert [records[p["prompt"]]["status"] for p in prompts] == ["ok", "ok", "ok", "failed"]
    assert summary["failures"] == {"500: Try again.": 1} and summary["complete"]
    # Each item is sent once per round until it is answered: 1, 2, 3 and all 4 rounds.
    assert [fake.attempts[p["prompt"]] for p in prompts[1:]] == [2, 3, 4]
    assert fake.answered["Batch fine?"] == 1 and len(fake.batches) == 4
