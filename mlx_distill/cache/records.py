"""Durable, append-only store of text records from an API teacher (Gemini).

Layout of a records directory::

    manifest.json            {"kind": "records", schema version, teacher id/params, shards, tallies}
    records-00000.jsonl      one JSON record per line, each carrying the sha256 of its own content
    records-00001.jsonl      ...
    .lock                    held (flock) by the one process that may write

Why JSONL appended with fsync rather than one atomic file per batch: an API run finishes
responses one at a time over hours, and each finished (paid-for) response must be durable before
it counts as done. Appending a line and fsyncing costs one small write per commit (commits are
grouped by the caller), while a file per response would mean millions of files and a file per
batch would lose everything not yet rolled into a batch. A SIGKILL can only tear the last line of
the last shard: the line checksum exposes it and the next writer truncates it away (that response
was never counted as done, so it is simply asked again). Records are found by key, a hash of
(model, the generation parameters that change an answer, prompt); the newest row for a key wins,
and an "ok" row is never followed by another row for the same key, so nothing is stored twice.
One store holds the records of every model and parameter set a run has used: a record made with
other parameters is kept (it was paid for) and simply not read by a run that does not ask for its
key. Operational settings (cost cap, rate limits, timeouts, retries, endpoint) are in no key.

The manifest is derived data (shard sizes, sha256 of their sealed prefix, usage and cost
tallies); it is rewritten atomically (temp file, fsync, rename) and rebuilt from the shards on
open, so a stale manifest after a kill loses nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from mlx_distill.errors import BadInput
from mlx_distill.files import write_json_atomic

SCHEMA_VERSION = 1
KIND = "records"
MANIFEST = "manifest.json"
SHARD_ROWS = 5000  # rows per shard before a new one starts
MANIFEST_EVERY_S = 1.0  # the manifest is refreshed at most this often while appending


def record_key(model: str, params: dict[str, Any], prompt: str) -> str:
    """Content address of one request: sha256 of canonical JSON of (model, params, prompt)."""
    text = json.dumps(
        {"model": model, "params": params, "prompt": prompt},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _line_sha(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "sha"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_line(record: dict[str, Any]) -> bytes:
    """One record as a checksummed JSONL line (the `sha` field covers every other field)."""
    record = dict(record)
    record["sha"] = _line_sha(record)
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _decode_line(line: bytes) -> dict[str, Any] | None:
    """The record on a complete line, or None if the line is torn or corrupt."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("sha") != _line_sha(record):
        return None
    return record


def _shard_name(index: int) -> str:
    return f"records-{index:05d}.jsonl"


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("records-*.jsonl"))


def _usage_add(total: dict[str, int], usage: dict[str, Any] | None) -> None:
    for name in ("prompt", "answer", "thoughts", "total"):
        total[name] = total.get(name, 0) + int((usage or {}).get(name, 0) or 0)


class RecordStore:
    """The writer side of a records directory; one per process (a file lock enforces it).

    `teacher` is {"id": ..., "params": ...} of the run that opens it, noted in the manifest; a
    store opened by another model or parameter set keeps its records (keys tell them apart).
    """

    def __init__(self, path: str | Path, teacher: dict[str, Any], *, shard_rows: int = SHARD_ROWS):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.teacher = teacher
        self.shard_rows = shard_rows
        self._lock = threading.Lock()
        self._lock_file = open(self.path / ".lock", "a+")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise BadInput(f"{self.path}: another process is writing this cache") from None
        try:
            old = _read_manifest(self.path) if (self.path / MANIFEST).exists() else None
        except BadInput:
            self._lock_file.close()
            raise
        self.meta: dict[str, Any] = dict(old.get("meta", {})) if old else {}
        self.records: dict[str, dict[str, Any]] = {}
        self.rows = 0
        self.usage: dict[str, int] = {}
        self.cost_usd = 0.0
        self._shard_info: list[dict[str, Any]] = []
        self._load()
        self._last_manifest = 0.0
        self.write_manifest()

    def _load(self) -> None:
        shards = _shards(self.path)
        for i, shard in enumerate(shards):
            data = shard.read_bytes()
            good = 0
            digest = hashlib.sha256()
            rows = 0
            for line in data.splitlines(keepends=True):
                record = _decode_line(line)
                if record is None:
                    if i != len(shards) - 1 or good + len(line) != len(data):
                        raise BadInput(
                            f"{shard}: corrupt record at byte {good}; run `mlx-distill cache "
                            "verify` and remove the damaged shard"
                        )
                    # A torn final line from an interrupted write: it was never counted as done.
                    with open(shard, "r+b") as f:
                        f.truncate(good)
                        f.flush()
                        os.fsync(f.fileno())
                    break
                self._ingest(record)
                digest.update(line)
                good += len(line)
                rows += 1
            self._shard_info.append(
                {"file": shard.name, "rows": rows, "bytes": good, "_sha": digest}
            )

    def _ingest(self, record: dict[str, Any]) -> None:
        key = record["key"]
        prev = self.records.get(key)
        if prev is None or prev.get("status") != "ok":
            self.records[key] = record
        self.rows += 1
        _usage_add(self.usage, record.get("usage"))
        self.cost_usd += float(record.get("cost_usd") or 0.0)

    def status(self, key: str) -> str | None:
        """'ok', 'failed' or None (never asked)."""
        record = self.records.get(key)
        return None if record is None else record.get("status")

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write `records` durably (one write + fsync); only then are they visible as done."""
        if not records:
            return
        with self._lock:
            for record in records:
                if self.status(record["key"]) == "ok":
                    raise ValueError(f"record {record['key']} is already stored")
            lines = [encode_line(r) for r in records]
            if not self._shard_info or self._shard_info[-1]["rows"] >= self.shard_rows:
                name = _shard_name(len(self._shard_info))
                self._shard_info.append(
                    {"file": name, "rows": 0, "bytes": 0, "_sha": hashlib.sha256()}
                )
            info = self._shard_info[-1]
            blob = b"".join(lines)
            with open(self.path / info["file"], "ab") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            info["_sha"].update(blob)
            info["rows"] += len(lines)
            info["bytes"] += len(blob)
            for line in lines:
                self._ingest(json.loads(line))
            if time.monotonic() - self._last_manifest >= MANIFEST_EVERY_S:
                self._write_manifest_locked()

    def set_meta(self, **items: Any) -> None:
        """Store run facts (batch job ids, logprobs downgrade) in the manifest, durably now."""
        with self._lock:
            # A copy: later changes to the caller's objects must not reach the manifest unasked.
            self.meta.update(json.loads(json.dumps(items)))
            self._write_manifest_locked()

    def counts(self) -> dict[str, int]:
        ok = sum(1 for r in self.records.values() if r.get("status") == "ok")
        return {"ok": ok, "failed": len(self.records) - ok, "rows": self.rows}

    def write_manifest(self) -> None:
        with self._lock:
            self._write_manifest_locked()

    def _write_manifest_locked(self) -> None:
        shards = [
            {
                "file": s["file"],
                "rows": s["rows"],
                "bytes": s["bytes"],
                "sha256": s["_sha"].hexdigest(),
            }
            for s in self._shard_info
        ]
        manifest = {
            "kind": KIND,
            "schema_version": SCHEMA_VERSION,
            "teacher": self.teacher,
            "shards": shards,
            **self.counts(),
            "usage": self.usage,
            "cost_usd": round(self.cost_usd, 9),
            "meta": self.meta,
        }
        write_json_atomic(self.path / MANIFEST, manifest, indent=1, sort_keys=True)
        self._last_manifest = time.monotonic()

    def close(self) -> None:
        """Refresh the manifest and release the writer lock."""
        if self._lock_file.closed:
            return
        self.write_manifest()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.exists():
        raise BadInput(f"{path}: no {MANIFEST}; not a records cache")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"{file}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if manifest.get("kind") != KIND:
        raise BadInput(f"{file}: kind is {manifest.get('kind')!r}, expected {KIND!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BadInput(
            f"{file}: schema version {manifest.get('schema_version')}, this mlx-distill reads "
            f"{SCHEMA_VERSION}"
        )
    return manifest


def read_records(path: str | Path, keys: list[str] | None = None) -> list[dict[str, Any]]:
    """The current record per key (in first-written order), without taking the writer lock.

    keys: only these, in this order (those never asked are left out). A torn final line (a
    writer killed mid-append) is skipped: that response never counted as done.
    """
    path = Path(path)
    _read_manifest(path)
    latest: dict[str, dict[str, Any]] = {}
    for shard in _shards(path):
        for line in shard.read_bytes().splitlines(keepends=True):
            record = _decode_line(line)
            if record is None:
                continue
            prev = latest.get(record["key"])
            if prev is None or prev.get("status") != "ok":
                latest[record["key"]] = record
    if keys is not None:
        return [latest[k] for k in keys if k in latest]
    return list(latest.values())


def records_info(path: str | Path) -> dict[str, Any]:
    """Summary of a records cache from its manifest (cheap: shards are only stat'ed)."""
    path = Path(path)
    manifest = _read_manifest(path)
    unsealed = 0
    for shard in manifest.get("shards", []):
        file = path / shard["file"]
        unsealed += max(0, (file.stat().st_size if file.exists() else 0) - shard["bytes"])
    listed = {s["file"] for s in manifest.get("shards", [])}
    unsealed += sum(s.stat().st_size for s in _shards(path) if s.name not in listed)
    return {
        "path": str(path),
        "kind": KIND,
        "schema_version": manifest["schema_version"],
        "teacher": manifest["teacher"],
        "rows": manifest["rows"],
        "ok": manifest["ok"],
        "failed": manifest["failed"],
        "shards": len(manifest.get("shards", [])),
        "usage": manifest.get("usage", {}),
        "cost_usd": manifest.get("cost_usd", 0.0),
        "batch_jobs": manifest.get("meta", {}).get("batch_jobs", []),
        "logprobs_disabled": manifest.get("meta", {}).get("logprobs_disabled"),
        "bytes_after_manifest": unsealed,  # rows appended since the last manifest refresh
    }


def records_verify(path: str | Path) -> dict[str, Any]:
    """Check every shard against the manifest and every line against its checksum.

    Raises BadInput naming the first bad shard; returns counts when all is well.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    listed = {s["file"]: s for s in manifest.get("shards", [])}
    for name in listed:
        if not (path / name).exists():
            raise BadInput(f"{path / name}: listed in the manifest but missing")
    rows = 0
    ok_keys: set[str] = set()
    for shard in _shards(path):
        data = shard.read_bytes()
        sealed = listed.get(shard.name)
        if sealed is not None:
            if len(data) < sealed["bytes"]:
                raise BadInput(f"{shard}: shorter than the manifest says ({len(data)} bytes)")
            if hashlib.sha256(data[: sealed["bytes"]]).hexdigest() != sealed["sha256"]:
                raise BadInput(f"{shard}: sha256 does not match the manifest")
        offset = 0
        for line in data.splitlines(keepends=True):
            record = _decode_line(line)
            if record is None:
                torn = offset + len(line) == len(data) and not line.endswith(b"\n")
                why = "torn final record (interrupted write; rerun teach to repair)"
                raise BadInput(f"{shard}: {why if torn else 'corrupt record'} at byte {offset}")
            if record.get("status") == "ok":
                if record["key"] in ok_keys:
                    raise BadInput(f"{shard}: record {record['key']} is stored twice")
                ok_keys.add(record["key"])
            rows += 1
            offset += len(line)
    return {
        "path": str(path),
        "kind": KIND,
        "ok": True,
        "rows": rows,
        "answered": len(ok_keys),
        "shards": len(_shards(path)),
    }
