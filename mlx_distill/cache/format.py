"""On-disk format of the token cache: manifest, shard files, compact target encoding.

A cache is a directory with `manifest.json` and `shard-NNNNNN.safetensors` files. Each shard is a
standard safetensors file (8-byte header length, JSON header, raw little-endian arrays) that we
write and read with NumPy: readers `np.memmap` it and slice one row's byte range, so a row is read
without loading the shard, any safetensors tool can open a shard, and one file per shard gives one
checksum and one atomic rename (temp file, fsync, rename). `.npy` would need one file per array and
MLX's loader reads whole files.

Rows are stored flat; per-row offsets give random access. For a row of T tokens the targets cover
the positions t < T - 1 whose next token is trained on (mask[t + 1]); other positions carry no
loss, so they are not stored. Arrays in a shard (R rows, N tokens, P target positions, E entries):

    row_tokens   (R + 1,) int64   token offsets          row_entries (R + 1,) int64 entry offsets
    tokens       (N,) uint8/16/32 ids                    mask        (N,) bool
    counts       (P,) uint8/16    entries per position   ids         packed `id_bits`-bit ids
    codes        (E,) uint8       8-bit values           ranges      (P, 2) float16 (topk only)
    text, row_text                UTF-8 JSON of each row's source record, and its offsets

Values. `topk` stores each position's top and k-th log-prob in float16 and every entry as an
8-bit code c = round(254 sqrt(u / s)), where u = top - logprob and s = top - kth (encoding
"sqrtlog8"). The square root spends the codes where probability mass is: an entry at u nats below
the top is off by at most sqrt(u s) / 254 + s / 258064 nats, plus float16 rounding of the ends
(relative 2^-11). The top and k-th entries are exact to float16; with s = 20 nats an entry half a
nat below the top is within 0.013 nats (1.3% of its probability, absolute error < 0.008 p_top),
one 10 nats below within 0.056 nats. A code linear in log-prob would err by s / 508 = 0.04 nats
right next to the top, where the mass is (caches written so, "loglinear8", still decode).
`sample` stores exact draw counts c (weight c / n): no quantization error.

Bytes per target position at k = 32 with b-bit ids: 4b (ids) + 32 (codes) + 4 (range) + 1 (count)
+ token and mask (2-4 bytes), plus the text record. A 384-id vocabulary (b = 9): 76; the
100-byte budget holds up to b = 15 (32,768 ids); Qwen2.5's 151,665 ids (b = 18): ~113. Prompt
tokens carry no targets, so the figure per token of a chat cache is lower.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mlx_distill.errors import BadInput
from mlx_distill.files import write_chunks_atomic, write_json_atomic

SCHEMA = 1
MANIFEST = "manifest.json"
CODE_LEVELS = 254  # topk codes 0 (the top) .. 254 (the k-th)
TOPK_SCHEMES = ("sqrtlog8", "loglinear8")  # the first is written; both are read

_ST_DTYPES = {
    np.dtype(np.uint8): "U8",
    np.dtype(np.uint16): "U16",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
    np.dtype(np.bool_): "BOOL",
}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def id_bits(vocab_size: int) -> int:
    """Fewest bits that hold every id below `vocab_size`."""
    return max(1, int(vocab_size - 1).bit_length())


def token_dtype(vocab_size: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise BadInput(f"vocabulary of {vocab_size} ids is too large for the cache format")


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """(E,) non-negative ints -> (ceil(E * bits / 8),) uint8, little-endian bit order."""
    ids = np.asarray(ids, dtype=np.uint32)
    planes = (ids[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_ids(packed: np.ndarray, bits: int, start: int, count: int) -> np.ndarray:
    """Entries [start, start + count) of a `pack_ids` stream -> (count,) int32.

    Reads a 32-bit little-endian window at each entry's first byte and shifts: valid for
    bits + 7 <= 32, i.e. vocabularies up to 2^25 ids.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int32)
    bit0 = start * bits
    byte0 = bit0 // 8
    byte1 = (bit0 + count * bits + 7) // 8
    raw = np.zeros(byte1 - byte0 + 4, dtype=np.uint8)
    raw[: byte1 - byte0] = packed[byte0:byte1]
    offs = (bit0 % 8) + np.arange(count, dtype=np.int64) * bits
    at = offs >> 3
    word = (
        raw[at].astype(np.uint32)
        | (raw[at + 1].astype(np.uint32) << 8)
        | (raw[at + 2].astype(np.uint32) << 16)
        | (raw[at + 3].astype(np.uint32) << 24)
    )
    return ((word >> (offs & 7).astype(np.uint32)) & np.uint32((1 << bits) - 1)).astype(np.int32)


def encode_topk(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, k) log-probs sorted descending -> codes (P, k) uint8, ranges (P, 2) float16 [top, kth].

    "sqrtlog8" codes (see module doc).
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    ranges = np.stack([lp[:, 0], lp[:, -1]], axis=1).astype(np.float16)
    hi = ranges[:, :1].astype(np.float32)
    span = np.maximum(hi - ranges[:, 1:].astype(np.float32), 1e-12)
    r = np.clip((hi - lp) / span, 0.0, 1.0)
    codes = np.rint(np.sqrt(r) * CODE_LEVELS).astype(np.uint8)
    # The ends are the stored ranges themselves; float16 rounding of `hi` must not, through
    # the square root's steep start, move the top entry off code 0.
    codes[:, 0], codes[:, -1] = 0, CODE_LEVELS
    return codes, ranges


def encode_topk_ragged(logprobs: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`encode_topk` for positions with different entry counts (0 allowed).

    logprobs (E,) flat, each position's entries sorted descending; counts (P,) ->
    codes (E,) uint8, ranges (P, 2) float16 (zeros for a position without entries).
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    counts = np.asarray(counts, dtype=np.int64)
    first = np.cumsum(counts) - counts
    has = counts > 0
    ranges = np.zeros((len(counts), 2), dtype=np.float16)
    ranges[has, 0] = lp[first[has]]
    ranges[has, 1] = lp[first[has] + counts[has] - 1]
    hi = np.repeat(ranges[:, 0].astype(np.float32), counts)
    span = np.maximum(hi - np.repeat(ranges[:, 1].astype(np.float32), counts), 1e-12)
    r = np.clip((hi - lp) / span, 0.0, 1.0)
    codes = np.rint(np.sqrt(r) * CODE_LEVELS).astype(np.uint8)
    codes[first[has]] = 0
    codes[first[has] + counts[has] - 1] = CODE_LEVELS
    return codes, ranges


def decode_topk(
    codes: np.ndarray, ranges: np.ndarray, counts: np.ndarray, scheme: str = TOPK_SCHEMES[0]
) -> np.ndarray:
    """Inverse of `encode_topk` on flat entries: codes (E,), ranges (P, 2), counts (P,) -> (E,)."""
    hi = np.repeat(ranges[:, 0].astype(np.float32), counts)
    lo = np.repeat(ranges[:, 1].astype(np.float32), counts)
    x = codes.astype(np.float32) / CODE_LEVELS
    if scheme == "loglinear8":  # schema-1 caches written before "sqrtlog8": code 0 is the k-th
        return lo + x * (hi - lo)
    return hi - x * x * (hi - lo)


def write_shard(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> dict:
    """Write a safetensors file atomically (temp, fsync, rename); return its size and sha256."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    blobs = []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads the header to 8-byte alignment
    sha256 = write_chunks_atomic(path, (len(head).to_bytes(8, "little"), head, *blobs))
    return {"bytes": path.stat().st_size, "sha256": sha256}


def read_shard(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map a shard: name -> read-only array view, and its metadata. BadInput if bad."""
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        n = int.from_bytes(bytes(buf[:8]), "little")
        header = json.loads(bytes(buf[8 : 8 + n]))
        base = 8 + n
        arrays = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            dt = _NP_DTYPES[info["dtype"]]
            if base + b > buf.size:
                raise ValueError("truncated")
            arrays[name] = buf[base + a : base + b].view(dt).reshape(info["shape"])
        return arrays, header.get("__metadata__", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(
            f"cache shard {path} is unreadable ({e}): run `mlx-distill cache verify`"
        ) from None


def read_json_manifest(path: Path) -> dict:
    """`path/manifest.json` as a dict, of any cache kind; BadInput when missing or malformed."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise BadInput(f"{path} is not a teacher cache: {MANIFEST} not found")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{file}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise BadInput(f"{file}: unreadable manifest (not a JSON object)")
    return manifest


def read_manifest(path: Path) -> dict:
    """Load a token cache's manifest; BadInput when missing, malformed or from a newer schema."""
    file = Path(path) / MANIFEST
    manifest = read_json_manifest(path)
    schema = manifest.get("schema")
    if not isinstance(schema, int):
        raise BadInput(f"{file}: manifest has no schema version")
    if schema > SCHEMA:
        raise BadInput(
            f"{path}: cache written by a newer mlx-distill (schema {schema}, this version reads "
            f"up to {SCHEMA}); upgrade mlx-distill or rebuild the cache"
        )
    return manifest


def write_manifest(path: Path, manifest: dict) -> None:
    """Replace `path/manifest.json` atomically."""
    write_json_atomic(Path(path) / MANIFEST, manifest, indent=1, sort_keys=True)
