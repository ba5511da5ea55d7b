"""Read a token cache: fingerprint checks, random row access, info and verification.

Shards are memory-mapped on first use and their sha256 is checked then (one sequential read per
shard per process), so training names a corrupted shard before it uses a row from it.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mlx_distill.cache import format as fmt
from mlx_distill.errors import BadInput
from mlx_distill.files import file_sha256
from mlx_distill.recipe import fingerprint as fingerprint_hash
from mlx_distill.text.examples import TokenizedExample


class CacheRow(NamedTuple):
    """One cached sequence of T tokens with P target positions and E entries.

    tokens (T,) int32; mask (T,) bool; positions (P,) int64, the t whose prediction of
    tokens[t + 1] has targets; counts (P,) int64 entries per position; ids (E,) int32;
    logprobs (E,) float32 (for `sample` caches, log-weights log(count / n)).
    """

    tokens: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    counts: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray


class TokenCache:
    """An opened, complete token cache. Rows are read by random access from memory-mapped shards."""

    def __init__(self, path: Path, manifest: dict, *, check_sums: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        self.fingerprint: dict = manifest["fingerprint"]
        self.targets: str = self.fingerprint["targets"]
        self.samples: int = int(self.fingerprint["samples"])
        self.vocab_size: int = int(self.fingerprint["vocab_size"])
        self.id_bits: int = int(manifest["encoding"]["id_bits"])
        self.values: str = manifest["encoding"]["values"]
        if self.values not in (*fmt.TOPK_SCHEMES, "counts"):
            raise BadInput(f"cache {path}: unknown value encoding {self.values!r}")
        self.k_slots: int = max(1, int(manifest["max_entries"]))  # widest position
        self.shards: list[dict] = manifest["shards"]
        self._starts = [s["first_row"] for s in self.shards]
        self._open: dict[int, dict[str, np.ndarray]] = {}
        self._check_sums = check_sums

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        arrays = self._open.get(i)
        if arrays is None:
            arrays = open_shard(self.path, self.shards[i], check_sum=self._check_sums)
            self._open[i] = arrays
        return arrays

    def row(self, index: int) -> CacheRow:
        """Row `index` (0 <= index < len(self))."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        s = bisect.bisect_right(self._starts, index) - 1
        a = self._shard(s)
        r = index - self.shards[s]["first_row"]
        t0, t1 = int(a["row_tokens"][r]), int(a["row_tokens"][r + 1])
        e0, e1 = int(a["row_entries"][r]), int(a["row_entries"][r + 1])
        tokens = np.asarray(a["tokens"][t0:t1], dtype=np.int32)
        mask = np.asarray(a["mask"][t0:t1], dtype=bool)
        positions = np.flatnonzero(mask[1:])
        # Position offsets inside the shard: target positions of earlier rows come first.
        p0 = int(a["_row_positions"][r])
        counts = np.asarray(a["counts"][p0 : p0 + len(positions)], dtype=np.int64)
        ids = fmt.unpack_ids(a["ids"], self.id_bits, e0, e1 - e0)
        codes = a["codes"][e0:e1]
        if self.targets == "topk":
            ranges = a["ranges"][p0 : p0 + len(positions)]
            logprobs = fmt.decode_topk(codes, ranges, counts, self.values)
        else:
            logprobs = np.log(codes.astype(np.float32) / np.float32(self.samples))
        return CacheRow(tokens, mask, positions, counts, ids, logprobs.astype(np.float32))

    def row_length(self, index: int) -> int:
        """Number of tokens of row `index`."""
        s = bisect.bisect_right(self._starts, index) - 1
        a = self._shard(s)
        r = index - self.shards[s]["first_row"]
        return int(a["row_tokens"][r + 1] - a["row_tokens"][r])

    def example(self, index: int) -> TokenizedExample:
        """Row `index` as a TokenizedExample, with its stored text record."""
        s = bisect.bisect_right(self._starts, index) - 1
        a = self._shard(s)
        r = index - self.shards[s]["first_row"]
        t0, t1 = int(a["row_tokens"][r]), int(a["row_tokens"][r + 1])
        x0, x1 = int(a["row_text"][r]), int(a["row_text"][r + 1])
        text = json.loads(bytes(a["text"][x0:x1]).decode()) if x1 > x0 else {}
        return TokenizedExample(a["tokens"][t0:t1], a["mask"][t0:t1], text)


def open_shard(root: Path, shard: dict, *, check_sum: bool = True) -> dict[str, np.ndarray]:
    """Map one shard and check it against its manifest entry; BadInput naming the shard."""
    file = root / shard["file"]
    repair = f"rebuild only the damaged shards: mlx-distill cache repair {root}"
    if not file.is_file():
        raise BadInput(f"cache {root}: shard {shard['file']} is missing; {repair}")
    if check_sum and file_sha256(file) != shard["sha256"]:
        raise BadInput(
            f"cache {root}: shard {shard['file']} is corrupted (checksum mismatch); {repair}"
        )
    arrays, meta = fmt.read_shard(file)
    try:
        rows = int(meta["rows"])
        ok = (
            rows == shard["rows"]
            and int(meta["first_row"]) == shard["first_row"]
            and len(arrays["row_tokens"]) == rows + 1
            and int(arrays["row_tokens"][-1]) == len(arrays["tokens"]) == len(arrays["mask"])
            and int(arrays["row_entries"][-1]) == len(arrays["codes"])
        )
    except (KeyError, ValueError):
        ok = False
    if not ok:
        raise BadInput(f"cache {root}: shard {shard['file']} does not match the manifest")
    # Per-row offsets into the position arrays, from the mask (positions are not stored twice).
    # A row's target positions are its mask[1:]: the mask sum minus the row's first token.
    mask = np.asarray(arrays["mask"], dtype=np.int64)
    bounds = np.asarray(arrays["row_tokens"])
    cum = np.concatenate([[0], np.cumsum(mask)])
    head = mask[np.minimum(bounds[:-1], len(mask) - 1)] if len(mask) else np.zeros(rows, int)
    first = np.where(bounds[1:] > bounds[:-1], head, 0)
    per_row = np.concatenate([[0], np.cumsum(cum[bounds[1:]] - cum[bounds[:-1]] - first)])
    if per_row[-1] != len(arrays["counts"]):
        raise BadInput(f"cache {root}: shard {shard['file']} has inconsistent target counts")
    arrays["_row_positions"] = per_row
    return arrays


def open_cache(path: str | Path, expect: dict | None = None) -> TokenCache:
    """Open a complete token cache; `expect` fields must equal the cache's fingerprint.

    BadInput names the first differing field and both values, a newer schema, an incomplete
    cache, or (when rows are read) a corrupted shard.
    """
    path = Path(path)
    kind = fmt.read_json_manifest(path).get("kind")
    if kind != "tokens":
        raise BadInput(f"{path} holds a {kind!r} cache, not token targets")
    manifest = fmt.read_manifest(path)
    fp = manifest["fingerprint"]
    for key, want in (expect or {}).items():
        have = fp.get(key, "(absent)")
        if _norm(have) != _norm(want):
            raise BadInput(
                f"cache {path} fingerprint differs from the recipe: {key} is {have!r} in the "
                f"cache, {want!r} in the recipe; rebuild the cache (or point to the right one)"
            )
    if not manifest.get("complete"):
        raise BadInput(
            f"cache {path} is incomplete ({manifest.get('rows', 0)} of "
            f"{manifest.get('total_rows')} rows): run the cache stage again to finish it"
        )
    return TokenCache(path, manifest)


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def cache_info(path: str | Path) -> dict:
    """Summary of a cache: rows, tokens, bytes, bytes/token, teacher, targets, k, fingerprint."""
    path = Path(path)
    if fmt.read_json_manifest(path).get("kind") == "records":
        return _records_module(path).records_info(path)
    manifest = fmt.read_manifest(path)
    fp = manifest["fingerprint"]
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    total = shard_bytes + (path / fmt.MANIFEST).stat().st_size
    tokens = int(manifest.get("tokens", 0))
    positions = int(manifest.get("positions", 0))
    return {
        "path": str(path),
        "kind": "tokens",
        "schema": manifest["schema"],
        "rows": int(manifest.get("rows", 0)),
        "total_rows": int(manifest["total_rows"]),
        "complete": bool(manifest.get("complete")),
        "tokens": tokens,
        "target_positions": positions,
        "entries": sum(s["entries"] for s in manifest["shards"]),
        "shards": len(manifest["shards"]),
        "bytes": total,
        "bytes_per_token": round(total / tokens, 2) if tokens else None,
        "bytes_per_target_position": round(total / positions, 2) if positions else None,
        "teacher": fp["teacher"],
        "targets": fp["targets"],
        "k": fp["k"] if fp["targets"] == "topk" else None,
        "samples": fp["samples"] if fp["targets"] == "sample" else None,
        "max_entries": int(manifest.get("max_entries", 0)),
        "temperature": fp["temperature"],
        "fingerprint": fp,
        "fingerprint_hash": manifest["fingerprint_hash"],
    }


def verify_cache(path: str | Path) -> dict:
    """Check fingerprint hash, every shard's checksum, structure and row counts.

    Raises BadInput naming the first bad shard; returns a report dict when all is well.
    """
    path = Path(path)
    if fmt.read_json_manifest(path).get("kind") == "records":
        return _records_module(path).records_verify(path)
    manifest = fmt.read_manifest(path)
    if fingerprint_hash(manifest["fingerprint"]) != manifest.get("fingerprint_hash"):
        raise BadInput(f"cache {path}: manifest fingerprint was edited (hash mismatch)")
    rows = tokens = 0
    for shard in manifest["shards"]:
        open_shard(path, shard, check_sum=True)
        if shard["first_row"] != shard["index"] * manifest["shard_rows"]:
            raise BadInput(f"cache {path}: shard {shard['file']} starts at the wrong row")
        rows += shard["rows"]
        tokens += shard["tokens"]
    if rows != manifest.get("rows"):
        raise BadInput(f"cache {path}: shards hold {rows} rows, manifest says {manifest['rows']}")
    if rows != manifest["total_rows"]:
        raise BadInput(
            f"cache {path}: incomplete, {rows} of {manifest['total_rows']} rows; "
            "run the cache stage again to finish it"
        )
    return {
        "path": str(path),
        "ok": True,
        "shards": len(manifest["shards"]),
        "rows": rows,
        "tokens": tokens,
        "fingerprint_hash": manifest["fingerprint_hash"],
    }


def _records_module(path: Path):
    try:
        from mlx_distill.cache import records
    except ImportError:
        raise BadInput(
            f"{path} is a text-records cache but mlx_distill.cache.records is not installed"
        ) from None
    return records
