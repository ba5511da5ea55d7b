"""Build a token cache from a local teacher: batched scoring, atomic shards, resumable.

Rows are assigned to shards by position (shard s holds rows [s * shard_rows, (s + 1) *
shard_rows)), so a shard's content depends only on the examples and the settings. Each shard is
written to a temp file, fsynced and renamed; then the manifest (same protocol) records it with its
checksum. A run killed at any moment leaves finished shards listed, at most one shard file that
the manifest does not list yet (rewritten, identically, on the next run) and stray temp files
(removed). Running again with the same arguments writes the missing shards only, so every row ends
up present exactly once. The manifest's `data_sha256` (a hash of every example's tokens and mask)
refuses a resume onto different examples.

Distributed (`world > 1`): rank r scores the shards whose index is r modulo world and records
them in its own `manifest.rank-R.json` after each shard (so each rank resumes on its own, and a
resume with another world size reuses every finished shard). When all ranks are done, rank 0's
`merge_rank_manifests` checks every shard's checksum and writes the one `manifest.json`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mlx_distill.cache import format as fmt
from mlx_distill.cache.sparse import RowTargets
from mlx_distill.errors import BadInput
from mlx_distill.files import file_sha256, write_json_atomic
from mlx_distill.recipe import fingerprint as fingerprint_hash
from mlx_distill.text.examples import TokenizedExample


def build_token_cache(
    teacher,
    examples: Sequence[TokenizedExample],
    out_dir: str | Path,
    *,
    targets: str = "topk",
    k: int = 16,
    samples: int = 32,
    temperature: float = 1.0,
    batch_size: int = 32,
    shard_rows: int = 1024,
    seed: int = 0,
    fingerprint: dict | None = None,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """Score `examples` with `teacher` (a LocalTeacher) into a cache at `out_dir`.

    targets: "topk" keeps k ids per position; "sample" draws `samples` ids per position (RS-KD).
    fingerprint: extra fields the targets depend on (chat template hash, the student tokenizer's
    `vocab_hash`, ...). A `vocab_hash` that differs from the teacher's is refused: token targets
    need a shared tokenizer. rank/world: score only this rank's shards (see the module
    docstring; the result is then this rank's partial manifest). Returns the manifest.
    """
    if targets not in ("topk", "sample"):
        raise BadInput(f"cache targets {targets!r}: expected topk or sample")
    if k <= 0 or samples <= 0 or batch_size <= 0 or shard_rows <= 0 or temperature <= 0:
        raise BadInput("cache k, samples, batch_size, shard_rows and temperature must be > 0")
    if not examples:
        raise BadInput("no examples to cache")
    extra = dict(fingerprint or {})
    if "vocab_hash" in extra and extra["vocab_hash"] != teacher.vocab_hash:
        raise BadInput(
            f"teacher {teacher.id} tokenizer differs from the student's (vocab hash "
            f"{teacher.vocab_hash} vs {extra['vocab_hash']}): token targets need a shared tokenizer"
        )
    fp: dict[str, Any] = {
        "schema": fmt.SCHEMA,
        "teacher": teacher.id,
        "teacher_version": teacher.version,
        "teacher_params": teacher.params,
        "vocab_hash": teacher.vocab_hash,
        "vocab_size": teacher.vocab_size,
        "targets": targets,
        "k": k,
        "samples": samples,
        "temperature": float(temperature),
        **extra,
    }
    # Normalise through JSON so a resumed run compares like with like (tuples, numpy ints).
    fp = json.loads(json.dumps(fp, default=str))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_sha = _data_hash(examples)
    total = len(examples)
    manifest = {
        "schema": fmt.SCHEMA,
        "kind": "tokens",
        "fingerprint": fp,
        "fingerprint_hash": fingerprint_hash(fp),
        "data_sha256": data_sha,
        "total_rows": total,
        "shard_rows": shard_rows,
        "seed": seed if targets == "sample" else None,  # top-k targets do not depend on it
        "encoding": {
            "id_bits": fmt.id_bits(teacher.vocab_size),
            "values": fmt.TOPK_SCHEMES[0] if targets == "topk" else "counts",
        },
        "shards": [],
    }
    n_shards = (total + shard_rows - 1) // shard_rows
    mine = [i for i in range(n_shards) if i % world == rank]
    lock_name = ".lock" if world == 1 else f".lock-rank{rank}"
    with open(out_dir / lock_name, "a+") as lock:
        try:  # one writer per cache (per rank): a second one would delete its temp files
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(f"{out_dir}: another process is writing this cache") from None
        if (out_dir / fmt.MANIFEST).exists():
            manifest = _resume(out_dir, manifest)
        if world > 1:
            manifest["shards"] = _finished_shards(out_dir, manifest)
        # Strays: every temp file alone, or (distributed) those of this rank's own shards.
        strays = ["*.tmp*"] if world == 1 else [fmt.shard_name(i) + ".tmp*" for i in mine]
        for pattern in strays + ([_rank_file(rank) + ".tmp*"] if world > 1 else []):
            for stray in out_dir.glob(pattern):
                stray.unlink()
        save = fmt.write_manifest if world == 1 else partial(_write_rank, rank=rank)
        _write_shards(
            teacher, examples, out_dir, manifest, progress, batch_size, samples, seed, mine, save
        )
    return manifest


def _rank_file(rank: int) -> str:
    return f"manifest.rank-{rank}.json"


def _write_rank(out_dir: Path, manifest: dict, rank: int) -> None:
    """Replace this rank's partial manifest atomically (temp, fsync, rename)."""
    write_json_atomic(out_dir / _rank_file(rank), manifest, indent=1, sort_keys=True)


def _finished_shards(out_dir: Path, manifest: dict) -> list[dict]:
    """Shards of `manifest` and of every rank's partial manifest made with the same settings,
    whose file is present with its recorded checksum; one entry per index, sorted."""
    found = {s["index"]: s for s in manifest["shards"]}
    for file in sorted(out_dir.glob("manifest.rank-*.json")):
        try:
            other = json.loads(file.read_text())
        except (OSError, ValueError):
            continue  # a damaged partial manifest: its shards are scored again
        keys = ("fingerprint", "data_sha256", "shard_rows", "total_rows", "seed")
        if any(other.get(k) != manifest[k] for k in keys):
            continue
        for shard in other.get("shards", []):
            found.setdefault(shard["index"], shard)
    return [
        s
        for _, s in sorted(found.items())
        if (out_dir / s["file"]).is_file() and file_sha256(out_dir / s["file"]) == s["sha256"]
    ]


def merge_rank_manifests(out_dir: str | Path) -> dict:
    """After every rank's `build_token_cache`: verify all shards, write the one manifest.json,
    remove the partial manifests. RuntimeError when a shard is missing or damaged. With no
    partial manifest (every shard was already finished: a rerun after the merge) the complete
    manifest.json is returned as it is."""
    out_dir = Path(out_dir)
    partial_files = sorted(out_dir.glob("manifest.rank-*.json"))
    if not partial_files and (out_dir / fmt.MANIFEST).exists():
        manifest = fmt.read_json_manifest(out_dir)
        if manifest.get("complete"):
            return manifest
    if not partial_files:
        raise RuntimeError(f"{out_dir}: no rank manifests to merge")
    manifest = json.loads(partial_files[0].read_text())
    manifest["shards"] = _finished_shards(out_dir, manifest)
    _summarize(manifest)
    if not manifest["complete"]:
        have = {s["index"] for s in manifest["shards"]}
        n_shards = (manifest["total_rows"] + manifest["shard_rows"] - 1) // manifest["shard_rows"]
        missing = [i for i in range(n_shards) if i not in have]
        raise RuntimeError(f"{out_dir}: shards {missing} are missing or damaged after all ranks")
    fmt.write_manifest(out_dir, manifest)
    for file in partial_files:
        file.unlink()
    return manifest


def _write_shards(
    teacher, examples, out_dir, manifest, progress, batch_size, samples, seed, indices, save
):
    """Score and write each shard of `indices` the manifest does not list yet; `save` the
    manifest after each."""
    fp = manifest["fingerprint"]
    targets, k, temperature = fp["targets"], fp["k"], fp["temperature"]
    total, shard_rows = manifest["total_rows"], manifest["shard_rows"]
    done = {s["index"] for s in manifest["shards"]}
    bar = None
    if progress:
        from tqdm import tqdm

        todo = sum(min(total, (i + 1) * shard_rows) - i * shard_rows for i in indices)
        done_rows = sum(s["rows"] for s in manifest["shards"] if s["index"] in set(indices))
        bar = tqdm(total=todo, initial=done_rows, unit="row", desc="teacher cache")
    for index in indices:
        if index in done:
            continue
        lo, hi = index * shard_rows, min(total, (index + 1) * shard_rows)
        rows = examples[lo:hi]
        # Score in length order so each batch pads little; results go back to row order.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].tokens))
        scored: list[RowTargets | None] = [None] * len(rows)
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            got = teacher.score(
                [rows[i] for i in idx],
                targets=targets,
                k=k,
                samples=samples,
                temperature=temperature,
                seed=seed,
                row_ids=[lo + i for i in idx],
            )
            for i, t in zip(idx, got):
                scored[i] = t
            if bar is not None:
                bar.update(len(idx))
        arrays, stats = encode_shard(rows, scored, teacher.vocab_size, targets, samples)
        meta = {"index": str(index), "first_row": str(lo), "rows": str(hi - lo)}
        written = fmt.write_shard(out_dir / fmt.shard_name(index), arrays, meta)
        manifest["shards"].append(
            {"index": index, "file": fmt.shard_name(index), "first_row": lo, "rows": hi - lo}
            | stats
            | written
        )
        manifest["shards"].sort(key=lambda s: s["index"])
        _summarize(manifest)
        save(out_dir, manifest)
    if bar is not None:
        bar.close()
    _summarize(manifest)
    save(out_dir, manifest)


def encode_shard(
    rows: Sequence[TokenizedExample],
    scored: Sequence[RowTargets],
    vocab_size: int,
    targets: str,
    samples: int,
) -> tuple[dict[str, np.ndarray], dict]:
    """Flatten rows and their targets into the shard arrays described in `format`.

    For `sample` targets, log-weights log(c / n) are stored as the exact draw counts c.
    """
    lengths = np.array([len(ex.tokens) for ex in rows], dtype=np.int64)
    entries = np.array([len(t.ids) for t in scored], dtype=np.int64)
    counts = np.concatenate([t.counts for t in scored]).astype(np.int64)
    ids = np.concatenate([t.ids for t in scored])
    lps = np.concatenate([t.logprobs for t in scored])
    max_count = int(counts.max()) if counts.size else 0
    arrays = {
        "row_tokens": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "row_entries": np.concatenate([[0], np.cumsum(entries)]).astype(np.int64),
        "tokens": np.concatenate([ex.tokens for ex in rows]).astype(fmt.token_dtype(vocab_size)),
        "mask": np.concatenate([ex.mask for ex in rows]).astype(np.bool_),
        "counts": counts.astype(np.uint8 if max_count <= 255 else np.uint16),
        "ids": fmt.pack_ids(ids, fmt.id_bits(vocab_size)),
    }
    if targets == "topk" and counts.size and (max_count == 0 or (counts != max_count).any()):
        # Ragged rows (a Gemini teacher's aligned targets: 0..k entries per position).
        codes, ranges = fmt.encode_topk_ragged(lps, counts)
        arrays["codes"] = codes
        arrays["ranges"] = ranges
    elif targets == "topk":
        width = max_count
        codes, ranges = fmt.encode_topk(lps.reshape(-1, width) if width else lps.reshape(0, 1))
        arrays["codes"] = codes.reshape(-1)
        arrays["ranges"] = ranges
    else:
        draws = np.rint(np.exp(lps.astype(np.float64)) * samples).astype(np.int64)
        arrays["codes"] = draws.astype(np.uint8 if draws.max(initial=0) <= 255 else np.uint16)
    text = [json.dumps(ex.text, ensure_ascii=False, default=str).encode() for ex in rows]
    arrays["row_text"] = np.concatenate([[0], np.cumsum([len(t) for t in text])]).astype(np.int64)
    arrays["text"] = np.frombuffer(b"".join(text), dtype=np.uint8)
    stats = {
        "tokens": int(lengths.sum()),
        "positions": int(counts.size),
        "entries": int(entries.sum()),
        "max_entries": max_count,
    }
    return arrays, stats


def _data_hash(examples: Sequence[TokenizedExample]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(len(ex.tokens).to_bytes(8, "little"))
        digest.update(ex.tokens.astype(np.int32).tobytes())
        digest.update(np.packbits(ex.mask).tobytes())
    return digest.hexdigest()


def _resume(out_dir: Path, fresh: dict) -> dict:
    """Continue an existing cache: same fingerprint, data and sharding; drop damaged shards."""
    kind = fmt.read_json_manifest(out_dir).get("kind")
    if kind != "tokens":
        raise BadInput(f"{out_dir} holds a {kind!r} cache, not a token cache")
    old = fmt.read_manifest(out_dir)
    for key in ("fingerprint", "data_sha256", "shard_rows", "total_rows", "seed"):
        if old.get(key) != fresh[key]:
            detail = _first_difference(old.get(key), fresh[key]) if key == "fingerprint" else ""
            raise BadInput(
                f"{out_dir} was built with a different {key}{detail}; "
                "delete it or choose another cache directory"
            )
    kept = []
    for shard in old["shards"]:
        file = out_dir / shard["file"]
        if file.is_file() and file_sha256(file) == shard["sha256"]:
            kept.append(shard)
    fresh["shards"] = kept
    return fresh


def _first_difference(old: Any, new: Any) -> str:
    for key in sorted(set(old or {}) | set(new or {})):
        if (old or {}).get(key) != (new or {}).get(key):
            return f" ({key}: cache has {(old or {}).get(key)!r}, now {(new or {}).get(key)!r})"
    return ""


def _summarize(manifest: dict) -> None:
    shards = manifest["shards"]
    manifest["rows"] = sum(s["rows"] for s in shards)
    manifest["tokens"] = sum(s["tokens"] for s in shards)
    manifest["positions"] = sum(s["positions"] for s in shards)
    manifest["max_entries"] = max((s["max_entries"] for s in shards), default=0)
    manifest["complete"] = manifest["rows"] == manifest["total_rows"]
