"""The records store: torn-tail repair, verify, lock, teacher mismatch, key stability."""

from __future__ import annotations

import json

import pytest

from mlx_distill.cache.records import (
    RecordStore,
    read_records,
    record_key,
    records_info,
    records_verify,
)
from mlx_distill.errors import BadInput

TEACHER = {"id": "gemini/gemini-2.5-flash", "params": {"temperature": 1.0}}


def row(key: str, status: str = "ok", cost: float = 0.5) -> dict:
    usage = {"prompt": 3, "answer": 4, "thoughts": 5, "total": 12}
    return {"key": key, "prompt": f"p-{key}", "status": status, "text": "t", "usage": usage,
            "cost_usd": cost, "error": None if status == "ok" else "boom"}  # fmt: skip


def test_key_depends_on_model_params_and_prompt():
    k = record_key("m", {"t": 1.0}, "hello")
    assert k == record_key("m", {"t": 1.0}, "hello") and len(k) == 32
    assert len({k, record_key("m2", {"t": 1.0}, "hello"), record_key("m", {"t": 0.5}, "hello"),
                record_key("m", {"t": 1.0}, "hello!")}) == 4  # fmt: skip


def test_append_reopen_tally_and_torn_tail(tmp_path):
    with RecordStore(tmp_path, TEACHER, shard_rows=2) as store:
        store.append([row("a"), row("b", "failed", 0.0)])
        store.append([row("c")])
        store.append([row("b")])  # a retried failure may be answered later
        with pytest.raises(ValueError, match="already stored"):
            store.append([row("a")])
    assert sorted(p.name for p in tmp_path.glob("records-*.jsonl")) == [
        "records-00000.jsonl",
        "records-00001.jsonl",
    ]
    info = records_info(tmp_path)
    assert (info["rows"], info["ok"], info["failed"]) == (4, 3, 0)
    assert info["cost_usd"] == pytest.approx(1.5) and info["usage"]["thoughts"] == 20
    # A writer killed mid-line leaves a torn tail: verify names it, the next writer trims it.
    last = tmp_path / "records-00001.jsonl"
    good = last.read_bytes()
    last.write_bytes(good + b'{"key": "d", "status": "o')
    with pytest.raises(BadInput, match="records-00001.jsonl: torn final record"):
        records_verify(tmp_path)
    assert {r["key"] for r in read_records(tmp_path)} == {"a", "b", "c"}
    with RecordStore(tmp_path, TEACHER, shard_rows=2) as store:
        assert store.status("b") == "ok" and store.status("d") is None
        assert store.counts() == {"ok": 3, "failed": 0, "rows": 4}
    assert last.read_bytes() == good
    # `mlx-distill cache info|verify` dispatch here on the manifest's kind.
    from mlx_distill.cache.reader import cache_info, verify_cache

    assert cache_info(tmp_path)["ok"] == 3 and verify_cache(tmp_path)["answered"] == 3
    assert records_verify(tmp_path) == {
        "path": str(tmp_path), "kind": "records", "ok": True, "rows": 4, "answered": 3,
        "shards": 2}  # fmt: skip


def test_verify_names_corrupt_shard_and_refuses_mixups(tmp_path):
    with RecordStore(tmp_path, TEACHER) as store:
        store.append([row("a"), row("b")])
        with pytest.raises(BadInput, match="another process is writing"):
            RecordStore(tmp_path, TEACHER)
    shard = tmp_path / "records-00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    edited = json.loads(lines[0])
    edited["text"] = "tampered"
    shard.write_text(json.dumps(edited) + "\n" + lines[1])
    with pytest.raises(BadInput, match="records-00000.jsonl: sha256 does not match"):
        records_verify(tmp_path)
    with pytest.raises(BadInput, match="corrupt record at byte 0"):
        RecordStore(tmp_path, TEACHER)
    # Another model's run shares the store: its records sit beside the first one's (keys differ).
    other = tmp_path / "other"
    with RecordStore(other, TEACHER) as store:
        store.append([row("a")])
    with RecordStore(other, {"id": "gemini/gemini-3-flash", "params": {}}) as store:
        assert store.status("a") == "ok"
        store.append([row("b")])
    assert [r["key"] for r in read_records(other, ["b", "a", "c"])] == ["b", "a"]
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "topk", "schema_version": 1}))
    with pytest.raises(BadInput, match="kind is 'topk', expected 'records'"):
        records_info(tmp_path)
