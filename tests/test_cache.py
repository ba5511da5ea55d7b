"""Token cache: encoding, round trips, unbiased sampling, refusals, corruption, size."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from tiny import random_examples, tiny_model, tiny_tokenizer

from mlx_distill.cache import build_token_cache, cache_info, open_cache, verify_cache
from mlx_distill.cache import format as fmt
from mlx_distill.cache.loader import Loader
from mlx_distill.cache.sparse import sample_targets
from mlx_distill.errors import BadInput
from mlx_distill.teachers.local import LocalTeacher

V = 97


@pytest.fixture(scope="module")
def teacher():
    model, _ = tiny_model(V, seed=3)
    return LocalTeacher((model, tiny_tokenizer(V)), name="tiny")


def reference_logprobs(teacher, ex, temperature=1.0) -> np.ndarray:
    """Full-vocabulary teacher log-probs (T, V) in float64, computed independently."""
    logits = np.array(teacher.model(mx.array(ex.tokens[None])).astype(mx.float32))[0]
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_pack_ids_round_trip_any_width_and_offset():
    rng = np.random.default_rng()
    for bits in (1, 5, 8, 9, 13, 17, 18, 25):
        ids = rng.integers(0, 1 << bits, size=int(rng.integers(1, 300)))
        packed = fmt.pack_ids(ids, bits)
        assert packed.size == (ids.size * bits + 7) // 8
        start = int(rng.integers(0, ids.size))
        got = fmt.unpack_ids(packed, bits, start, ids.size - start)
        np.testing.assert_array_equal(got, ids[start:])
    assert fmt.id_bits(384) == 9 and fmt.id_bits(151_665) == 18 and fmt.id_bits(256) == 8


def test_topk_codes_error_within_stated_bound():
    rng = np.random.default_rng()
    lp = -np.sort(rng.exponential(4.0, size=(200, 32)), axis=1).astype(np.float32)
    codes, ranges = fmt.encode_topk(lp)
    got = fmt.decode_topk(codes.reshape(-1), ranges, np.full(200, 32)).reshape(200, 32)
    assert np.all(np.abs(got - lp) <= topk_error_bound(lp))
    np.testing.assert_allclose(got[:, [0, -1]], lp[:, [0, -1]], rtol=2.0**-10, atol=1e-6)
    # the square-root code is finer than a linear one where the probability is
    # (within a nat of the top, when the spread is > 4 nats): below a linear code's s / 508
    spread = lp[:, :1] - lp[:, -1:]
    near = ((lp[:, :1] - lp) < 1.0) & (spread > 4.0)
    assert np.all((np.abs(got - lp) < np.broadcast_to(spread / 508, lp.shape))[near])
    # caches written with the earlier linear codes (code 0 = k-th, 254 = top) still decode
    hi, lo = ranges[:, :1].astype(np.float32), ranges[:, 1:].astype(np.float32)
    linear_codes = np.rint((lp - lo) / (hi - lo) * 254).clip(0, 254).astype(np.uint8)
    linear = fmt.decode_topk(linear_codes.reshape(-1), ranges, np.full(200, 32), "loglinear8")
    err = np.abs(linear.reshape(200, 32) - lp)
    assert np.all(err <= (hi - lo) / 508 + np.abs(lp).max(axis=1, keepdims=True) * 2.0**-10)


def topk_error_bound(lp: np.ndarray) -> np.ndarray:
    """The module's stated bound for (P, k) descending log-probs, plus float16 rounding."""
    u, s = lp[:, :1] - lp, lp[:, :1] - lp[:, -1:]
    return np.sqrt(u * s) / 254 + s / 258064 + np.abs(lp).max(axis=1, keepdims=True) * 2.0**-10


def test_sampled_weights_are_unbiased():
    # A known distribution with a long tail: top-k would drop the tail, sampling must not.
    rng = np.random.default_rng()
    p = rng.dirichlet(np.full(12, 0.3))
    P, n = 4000, 8
    counts, ids, draws = sample_targets(np.log(np.tile(p, (P, 1))), n, rng)
    assert counts.sum() == ids.size and np.all(counts >= 1) and np.all(counts <= n)
    starts = np.cumsum(counts) - counts
    assert np.all(np.add.reduceat(draws, starts) == n)  # each position's weights sum to 1
    mean = np.bincount(ids, weights=draws / n, minlength=12) / P
    se = np.sqrt(p * (1 - p) / (n * P))
    assert np.all(np.abs(mean - p) <= 4.5 * se + 1e-12), (mean, p)
    assert np.all(mean[p < 1e-9] == 0)


def test_topk_round_trip_matches_teacher(teacher, tmp_path):
    examples = random_examples(23, V, seed=0)
    m = build_token_cache(
        teacher,
        examples,
        tmp_path,
        k=6,
        temperature=2.0,
        batch_size=5,
        shard_rows=8,
        fingerprint={"chat_template": "abc"},
        progress=False,
    )
    assert m["complete"] and m["rows"] == 23 and len(m["shards"]) == 3
    cache = open_cache(tmp_path, expect={"k": 6, "targets": "topk", "chat_template": "abc"})
    for i in (0, 7, 8, 22):
        ex, row = examples[i], cache.row(i)
        np.testing.assert_array_equal(row.tokens, ex.tokens)
        np.testing.assert_array_equal(row.mask, ex.mask)
        np.testing.assert_array_equal(row.positions, np.flatnonzero(ex.mask[1:]))
        assert cache.example(i).text == ex.text
        ref = reference_logprobs(teacher, ex, temperature=2.0)[row.positions]
        ids = row.ids.reshape(-1, 6)
        lps = row.logprobs.reshape(-1, 6)
        ref_top = -np.sort(-ref, axis=1)[:, :6]
        np.testing.assert_allclose(np.take_along_axis(ref, ids, 1), ref_top, atol=1e-5)
        assert np.all(np.abs(lps - ref_top) <= topk_error_bound(ref_top) + 1e-4)


def test_sample_round_trip_is_deterministic_and_exact(teacher, tmp_path):
    examples = random_examples(12, V, seed=1)
    kw = dict(targets="sample", samples=16, batch_size=4, shard_rows=5, seed=7, progress=False)
    build_token_cache(teacher, examples, tmp_path / "a", **kw)
    build_token_cache(teacher, examples, tmp_path / "b", **(kw | {"batch_size": 3}))
    a, b = open_cache(tmp_path / "a"), open_cache(tmp_path / "b")
    for i in range(12):
        ra, rb = a.row(i), b.row(i)
        np.testing.assert_array_equal(ra.ids, rb.ids)  # independent of batching
        weights = np.exp(ra.logprobs.astype(np.float64)) * 16
        np.testing.assert_allclose(weights, np.rint(weights), atol=1e-4)
        starts = np.cumsum(ra.counts) - ra.counts
        np.testing.assert_allclose(np.add.reduceat(weights, starts), 16, atol=1e-3)
        ref = reference_logprobs(teacher, examples[i])[ra.positions]
        assert np.all(ref[np.repeat(np.arange(len(ra.counts)), ra.counts), ra.ids] > -30)
    assert a.k_slots == max(a.manifest["max_entries"], 1) <= 16


def test_size_at_k32_under_100_bytes_per_token(tmp_path):
    model, _ = tiny_model(384, seed=0)
    t = LocalTeacher((model, tiny_tokenizer(384)))
    examples = random_examples(40, 384, seed=2, lo=60, hi=160)
    for ex in examples:  # a chat-like answer: every token after the first carries targets
        ex.mask[1:] = True
    build_token_cache(t, examples, tmp_path, k=32, batch_size=8, progress=False)
    info = cache_info(tmp_path)
    assert info["tokens"] == sum(len(ex.tokens) for ex in examples)
    assert info["target_positions"] == info["tokens"] - 40
    assert info["bytes_per_target_position"] <= 100, info
    assert info["k"] == 32 and info["teacher"] == "local" and info["targets"] == "topk"


def test_fingerprint_refusals_name_field_and_values(teacher, tmp_path):
    examples = random_examples(6, V, seed=3)
    build_token_cache(teacher, examples, tmp_path, k=4, progress=False)
    with pytest.raises(BadInput, match=r"k is 4 in the cache, 32 in the recipe"):
        open_cache(tmp_path, expect={"k": 32})
    with pytest.raises(BadInput, match=r"chat_template is '\(absent\)'.*'x'"):
        open_cache(tmp_path, expect={"chat_template": "x"})
    with pytest.raises(BadInput, match=r"different fingerprint \(k: cache has 4, now 5\)"):
        build_token_cache(teacher, examples, tmp_path, k=5, progress=False)
    with pytest.raises(BadInput, match="different data_sha256"):
        build_token_cache(teacher, examples[:5], tmp_path, k=4, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["schema"] = fmt.SCHEMA + 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInput, match=f"newer mlx-distill \\(schema {fmt.SCHEMA + 1}"):
        open_cache(tmp_path)
    with pytest.raises(BadInput, match="newer"):
        verify_cache(tmp_path)


def test_incomplete_cache_is_refused(teacher, tmp_path):
    examples = random_examples(9, V, seed=4)
    build_token_cache(teacher, examples, tmp_path, k=4, shard_rows=4, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:2]
    manifest["rows"], manifest["complete"] = 8, False
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInput, match="incomplete \\(8 of 9 rows\\)"):
        open_cache(tmp_path)
    with pytest.raises(BadInput, match="incomplete, 8 of 9 rows"):
        verify_cache(tmp_path)
    # resuming finishes only the missing shard
    before = (tmp_path / "shard-000000.safetensors").stat().st_mtime_ns
    build_token_cache(teacher, examples, tmp_path, k=4, shard_rows=4, progress=False)
    assert (tmp_path / "shard-000000.safetensors").stat().st_mtime_ns == before
    assert verify_cache(tmp_path)["rows"] == 9


def test_corrupted_shard_is_named_by_verify_reader_and_loader(teacher, tmp_path):
    examples = random_examples(10, V, seed=5)
    build_token_cache(teacher, examples, tmp_path, k=4, shard_rows=4, progress=False)
    assert verify_cache(tmp_path)["ok"]
    bad = tmp_path / "shard-000001.safetensors"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x5A
    bad.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="shard-000001.safetensors is corrupted"):
        verify_cache(tmp_path)
    cache = open_cache(tmp_path)
    assert cache.row(0).tokens.size == examples[0].tokens.size  # other shards still read
    with pytest.raises(BadInput, match="shard-000001.safetensors is corrupted"):
        cache.row(5)
    loader = Loader(open_cache(tmp_path), batch_size=10, seq_len=16, seed=0)
    with pytest.raises(BadInput, match="shard-000001"):
        next(loader)
    bad.write_bytes(bytes(data[:100]))
    with pytest.raises(BadInput, match="shard-000001.safetensors"):
        verify_cache(tmp_path)
    bad.unlink()
    with pytest.raises(BadInput, match="shard-000001.safetensors is missing"):
        verify_cache(tmp_path)


def test_info_and_verify_report_values(teacher, tmp_path):
    examples = random_examples(7, V, seed=6)
    build_token_cache(teacher, examples, tmp_path, k=3, shard_rows=3, progress=False)
    info = cache_info(tmp_path)
    files = list(tmp_path.iterdir())
    assert info["bytes"] == sum(f.stat().st_size for f in files)
    assert info["rows"] == 7 and info["shards"] == 3 and info["complete"]
    assert info["bytes_per_token"] == round(info["bytes"] / info["tokens"], 2)
    assert info["fingerprint"]["teacher_version"] == teacher.version
    assert info["entries"] == 3 * info["target_positions"]
    report = verify_cache(tmp_path)
    assert report["ok"] and report["rows"] == 7 and report["tokens"] == info["tokens"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["fingerprint"]["k"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInput, match="fingerprint was edited"):
        verify_cache(tmp_path)


def test_not_a_cache_and_bad_arguments(teacher, tmp_path):
    with pytest.raises(BadInput, match="manifest.json not found"):
        cache_info(tmp_path)
    with pytest.raises(BadInput, match="expected topk or sample"):
        build_token_cache(teacher, random_examples(2, V, 0), tmp_path, targets="dense")
    with pytest.raises(BadInput, match="must be > 0"):
        build_token_cache(teacher, random_examples(2, V, 0), tmp_path, k=0)
    with pytest.raises(BadInput, match="outside the teacher's 97-id vocabulary"):
        build_token_cache(teacher, random_examples(2, 120, 0, lo=30), tmp_path, progress=False)


def test_records_cache_dispatch(tmp_path):
    records = pytest.importorskip("mlx_distill.cache.records")
    with records.RecordStore(tmp_path, {"id": "api-teacher", "params": {}}) as store:
        store.append([{"key": "a", "status": "ok", "prompt": "p", "text": "t"}])
    info = cache_info(tmp_path)
    assert info["kind"] == "records" and info["rows"] == 1
    assert verify_cache(tmp_path)["answered"] == 1
    with pytest.raises(BadInput, match="holds a 'records' cache, not token targets"):
        open_cache(tmp_path)


def test_topk_resume_ignores_seed_sample_does_not(teacher, tmp_path):
    examples = random_examples(5, V, seed=8)
    build_token_cache(teacher, examples, tmp_path / "t", k=3, seed=1, progress=False)
    again = build_token_cache(teacher, examples, tmp_path / "t", k=3, seed=2, progress=False)
    assert again["complete"]
    build_token_cache(teacher, examples, tmp_path / "s", targets="sample", seed=1, progress=False)
    with pytest.raises(BadInput, match="different seed"):
        build_token_cache(teacher, examples, tmp_path / "s", targets="sample", seed=2)


def test_rows_without_targets_round_trip(teacher, tmp_path):
    from mlx_distill.text.examples import TokenizedExample

    examples = [
        TokenizedExample(np.array([5]), np.array([True]), {"n": 1}),
        TokenizedExample(np.array([5, 6, 7]), np.zeros(3, bool), {"n": 3}),
        *random_examples(3, V, seed=11),
    ]
    build_token_cache(teacher, examples, tmp_path, k=4, shard_rows=2, progress=False)
    cache = open_cache(tmp_path)
    assert verify_cache(tmp_path)["rows"] == 5
    assert cache.row(0).positions.size == 0 and cache.row(1).ids.size == 0
    assert cache.row(2).ids.size == 4 * cache.row(2).positions.size > 0
    batch = next(Loader(cache, batch_size=5, seq_len=8, seed=0, shuffle=False))
    assert not np.array(batch.mask)[:2].any()
    assert np.all(np.array(batch.targets.logprobs)[:2, :, 0] == 0)


def test_second_writer_is_refused(teacher, tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BadInput, match="another process is writing this cache"):
            build_token_cache(teacher, random_examples(2, V, 0), tmp_path, progress=False)
    assert not (tmp_path / "manifest.json").exists()
    build_token_cache(teacher, random_examples(2, V, 0), tmp_path, progress=False)
    assert verify_cache(tmp_path)["rows"] == 2
