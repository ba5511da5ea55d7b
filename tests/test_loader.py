"""Loader: alignment of tokens, labels, mask and targets; determinism; exact resume; packing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import random_examples, tiny_model, tiny_tokenizer

from mlx_distill.cache import build_token_cache, open_cache
from mlx_distill.cache.loader import Loader
from mlx_distill.errors import BadInput
from mlx_distill.teachers.local import LocalTeacher

V = 97


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model, _ = tiny_model(V, seed=5)
    teacher = LocalTeacher((model, tiny_tokenizer(V)))
    examples = random_examples(21, V, seed=9, lo=2, hi=30)
    path = tmp_path_factory.mktemp("cache")
    build_token_cache(teacher, examples, path, k=5, shard_rows=8, progress=False)
    return examples, open_cache(path)


def _np(batch):
    out = [np.array(batch.tokens), np.array(batch.labels), np.array(batch.mask)]
    if batch.targets is not None:
        out += [np.array(batch.targets.ids), np.array(batch.targets.logprobs)]
    return out


def _order(n, seed, epochs):
    return np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(epochs)])


def test_examples_source_alignment_padding_and_truncation(built):
    examples, _ = built
    L, B = 16, 4
    loader = Loader(examples, batch_size=B, seq_len=L, seed=1)
    order = _order(len(examples), 1, 2)
    for step in range(8):  # crosses the epoch boundary at row 21
        tokens, labels, mask = _np(next(loader))
        assert tokens.dtype == np.int32 and mask.dtype == bool
        for b in range(B):
            ex = examples[order[step * B + b]]
            T = len(ex.tokens)
            n_in, n_lab = min(T, L), min(T - 1, L)
            np.testing.assert_array_equal(tokens[b, :n_in], ex.tokens[:n_in])
            np.testing.assert_array_equal(labels[b, :n_lab], ex.tokens[1 : n_lab + 1])
            np.testing.assert_array_equal(mask[b, :n_lab], ex.mask[1 : n_lab + 1])
            assert not mask[b, n_lab:].any() and not tokens[b, n_in:].any()
    assert loader.state_dict()["position"] == 8 * B
    loader.close()


def test_cache_targets_aligned_with_labels(built):
    examples, cache = built
    loader = Loader(cache, batch_size=5, seq_len=20, seed=2)
    order = _order(len(examples), 2, 1)
    for step in range(4):
        tokens, labels, mask, ids, lps = _np(next(loader))
        assert ids.shape == (5, 20, 5) and lps.dtype == np.float32
        for b in range(5):
            row = cache.row(int(order[step * 5 + b]))
            np.testing.assert_array_equal(tokens[b, : min(20, len(row.tokens))], row.tokens[:20])
            keep = row.positions < 20
            got_ids = ids[b, row.positions[keep]]
            np.testing.assert_array_equal(got_ids.reshape(-1), row.ids[: keep.sum() * 5])
            np.testing.assert_array_equal(
                lps[b, row.positions[keep]].reshape(-1), row.logprobs[: keep.sum() * 5]
            )
            assert np.all(mask[b, row.positions[keep]])
            # untargeted positions: the label with probability 1, other slots empty
            other = np.setdiff1d(np.arange(20), row.positions)
            np.testing.assert_array_equal(ids[b, other, 0], labels[b, other])
            assert np.all(lps[b, other, 0] == 0) and np.all(np.isneginf(lps[b, other, 1:]))
            assert not mask[b, other].any()
    loader.close()


def test_same_seed_same_batches_and_baseline_sees_same_sequences(built):
    examples, cache = built
    a = Loader(cache, batch_size=3, seq_len=12, seed=4)
    b = Loader(cache, batch_size=3, seq_len=12, seed=4, prefetch=1)
    base = Loader(examples, batch_size=3, seq_len=12, seed=4)
    other = Loader(examples, batch_size=3, seq_len=12, seed=5)
    differs = False
    for _ in range(9):
        xa, xb, xbase, xo = _np(next(a)), _np(next(b)), _np(next(base)), _np(next(other))
        for u, v in zip(xa, xb):
            np.testing.assert_array_equal(u, v)
        for u, v in zip(xa[:3], xbase):
            np.testing.assert_array_equal(u, v)
        differs |= not np.array_equal(xbase[0], xo[0])
    assert differs
    for loader in (a, b, base, other):
        loader.close()


def test_epoch_covers_every_row_once(built):
    examples, _ = built
    seen = []
    loader = Loader(examples, batch_size=7, seq_len=40, seed=0)
    for _ in range(3):
        tokens = _np(next(loader))[0]
        seen += [tuple(t[t != 0]) for t in tokens]
    want = [tuple(ex.tokens[ex.tokens != 0]) for ex in examples]
    assert sorted(seen) == sorted(want)
    unshuffled = Loader(examples, batch_size=7, seq_len=40, seed=0, shuffle=False)
    np.testing.assert_array_equal(_np(next(unshuffled))[0][0, :5], examples[0].tokens[:5])
    loader.close(), unshuffled.close()


def test_exact_resume_from_state_dict(built):
    _, cache = built
    first = Loader(cache, batch_size=4, seq_len=16, seed=8)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [_np(next(first)) for _ in range(6)]
    resumed = Loader(cache, batch_size=4, seq_len=16, seed=8)
    next(resumed)  # a loader that already ran is repositioned too
    resumed.load_state_dict(state)
    for want in expected:
        for u, v in zip(_np(next(resumed)), want):
            np.testing.assert_array_equal(u, v)
    with pytest.raises(BadInput, match="seq_len is 16 in the checkpoint, 32 now"):
        Loader(cache, batch_size=4, seq_len=32, seed=8).load_state_dict(state)
    first.close(), resumed.close()


def test_packing_fills_rows_and_masks_document_boundaries(built):
    examples, cache = built
    L = 40
    loader = Loader(cache, batch_size=2, seq_len=L, seed=0, pack=True)
    order = _order(len(examples), 0, 2)
    tokens, labels, mask, ids, lps = _np(next(loader))
    n = 0
    for b in range(2):
        offset = 0
        while offset < L:
            ex = examples[order[n]]
            if offset and offset + len(ex.tokens) > L:
                break
            T = min(len(ex.tokens), L - offset)
            np.testing.assert_array_equal(tokens[b, offset : offset + T], ex.tokens[:T])
            np.testing.assert_array_equal(mask[b, offset : offset + T - 1], ex.mask[1:T])
            if offset + T < L:
                assert not mask[b, offset + T - 1]  # would predict the next document
            offset += len(ex.tokens)
            n += 1
        end = min(offset, L)
        np.testing.assert_array_equal(labels[b, : end - 1], tokens[b, 1:end])
    assert n >= 3 and loader.state_dict()["position"] == n
    loader.close()


def test_bad_arguments():
    with pytest.raises(BadInput, match="no training sequences"):
        Loader([], batch_size=2, seq_len=4)
    with pytest.raises(BadInput, match="must be > 0"):
        Loader(random_examples(2, V, 0), batch_size=0, seq_len=4)


@pytest.mark.parametrize("targets", ["topk", "sample"])
def test_batches_feed_distill_loss(tmp_path, targets):
    from mlx_distill.kernels import distill_loss
    from mlx_distill.models import hidden_states, lm_head_weight

    model, _ = tiny_model(V, seed=6)
    teacher = LocalTeacher((model, tiny_tokenizer(V)))
    examples = random_examples(12, V, seed=10)
    build_token_cache(teacher, examples, tmp_path, targets=targets, k=8, samples=32, progress=False)
    batch = next(Loader(open_cache(tmp_path), batch_size=12, seq_len=40, seed=0))
    hidden = hidden_states(model, batch.tokens)
    loss, metrics = distill_loss(hidden, lm_head_weight(model), batch.targets, mask=batch.mask)
    kd, covered = float(metrics["kd"]), float(metrics["covered_mass"])
    assert np.isfinite(float(loss))
    if targets == "topk":
        # the teacher as its own student: KL(p || p) up to the stated 8-bit quantization error
        assert kd < 2e-3 and 0.5 < covered <= 1.0 + 1e-3
    else:
        # sampled weights sum to 1 at every position; KL of the estimate is positive
        assert abs(covered - 1.0) < 1e-4 and kd > 0


def test_abandoned_loader_stops_its_thread(built):
    import gc
    import threading
    import time

    examples, _ = built
    before = threading.active_count()
    loader = Loader(examples, batch_size=2, seq_len=8, seed=0)
    next(loader)
    assert threading.active_count() == before + 1
    del loader
    gc.collect()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
