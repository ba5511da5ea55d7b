"""LocalTeacher: mlx-lm folders (full, 4-bit), batched scoring, padded vocabularies, generation."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest
from tiny import random_examples, save_teacher, tiny_model, tiny_tokenizer

from mlx_distill.cache import build_token_cache, open_cache
from mlx_distill.errors import BadInput
from mlx_distill.teachers.local import LocalTeacher

V = 97


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def dense_targets(model, ex, vocab=V, temperature=1.0) -> np.ndarray:
    """(P, vocab) reference log-probs at the example's loss positions."""
    logits = np.array(model(mx.array(ex.tokens[None])).astype(mx.float32))[0, :, :vocab]
    return log_softmax(logits, temperature)[np.flatnonzero(ex.mask[1:])]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model, args = tiny_model(V, seed=21)
    path = save_teacher(tmp_path_factory.mktemp("teacher"), model, args, tiny_tokenizer(V))
    return path, model, args


def test_folder_teacher_scores_like_the_model(folder):
    path, model, _ = folder
    teacher = LocalTeacher(path)
    assert teacher.id == str(path) and teacher.vocab_size == V
    assert teacher.version == LocalTeacher((model, tiny_tokenizer(V))).version
    assert teacher.params["quantization"] is None and teacher.params["parameters"] > 0
    examples = random_examples(7, V, seed=1)
    got = teacher.score(examples, k=4, temperature=1.5)
    for ex, row in zip(examples, got):
        ref = dense_targets(model, ex, temperature=1.5)
        assert row.counts.tolist() == [4] * len(ref)
        ids = row.ids.reshape(-1, 4)
        np.testing.assert_allclose(
            row.logprobs.reshape(-1, 4), np.take_along_axis(ref, ids, 1), atol=2e-5
        )
        np.testing.assert_allclose(row.logprobs.reshape(-1, 4), -np.sort(-ref, 1)[:, :4], atol=2e-5)


def test_batching_and_chunking_do_not_change_scores(folder):
    path, _, _ = folder
    examples = random_examples(6, V, seed=2, lo=2, hi=25)
    whole = LocalTeacher(path).score(examples, k=3)
    tiny_chunks = LocalTeacher(path, max_logits_mb=0)  # one row per forward pass
    for ex, want in zip(examples, whole):
        (alone,) = tiny_chunks.score([ex], k=3)
        np.testing.assert_array_equal(alone.ids, want.ids)
        np.testing.assert_allclose(alone.logprobs, want.logprobs, atol=1e-5)


def test_padded_vocabulary_ignores_extra_rows_and_warns_once():
    model, _ = tiny_model(V + 7, seed=4)
    teacher = LocalTeacher((model, tiny_tokenizer(V)))
    examples = random_examples(5, V, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = teacher.score(examples, k=8)
        second = teacher.score(examples, targets="sample", samples=64)
    padded = [w for w in caught if "padded rows" in str(w.message)]
    assert len(padded) == 1 and "104 output rows for 97 tokenizer ids" in str(padded[0].message)
    for ex, row, drawn in zip(examples, first, second):
        assert row.ids.max() < V and drawn.ids.max() < V
        ref = dense_targets(model, ex)  # renormalized over the tokenizer's ids
        np.testing.assert_allclose(row.logprobs.reshape(-1, 8), -np.sort(-ref, 1)[:, :8], atol=2e-5)
    smaller = LocalTeacher((tiny_model(50, seed=1)[0], tiny_tokenizer(V)))
    with pytest.raises(BadInput, match="50 output rows but its tokenizer has 97 ids"):
        smaller.score(examples[:1])


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_teacher_made_here(folder, tmp_path, bits):
    _, model, args = folder
    q_model, _ = tiny_model(V, seed=21)  # same weights as `model`, quantized on save
    path = save_teacher(tmp_path / "q", q_model, args, tiny_tokenizer(V), quantize_bits=bits)
    teacher = LocalTeacher(path)
    assert teacher.params["quantization"]["bits"] == bits
    assert teacher.version != LocalTeacher((model, tiny_tokenizer(V))).version
    examples = random_examples(8, V, seed=5)
    got = teacher.score(examples, k=4)
    agree = total = 0
    for ex, row in zip(examples, got):
        ref_q = dense_targets(teacher.model, ex)
        np.testing.assert_allclose(
            row.logprobs.reshape(-1, 4), -np.sort(-ref_q, 1)[:, :4], atol=2e-5
        )
        top_fp = dense_targets(model, ex).argmax(1)
        agree += int((row.ids.reshape(-1, 4)[:, 0] == top_fp).sum())
        total += len(top_fp)
    assert agree / total >= (0.7 if bits == 4 else 0.9)  # most of the teacher's argmax
    build_token_cache(teacher, examples, tmp_path / "cache", k=4, progress=False)
    assert len(open_cache(tmp_path / "cache")) == 8


def test_vocabulary_map_not_size_decides_compatibility(folder, tmp_path):
    path, _, _ = folder
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    # same size, two ids swapped: a size check would pass, the hash does not
    vocab = {f"t{i}": i for i in range(V)}
    vocab["t5"], vocab["t6"] = 6, 5
    swapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    )
    teacher = LocalTeacher(path)
    student_hash = LocalTeacher((teacher.model, swapped)).vocab_hash
    assert student_hash != teacher.vocab_hash
    with pytest.raises(BadInput, match="tokenizer differs from the student's"):
        build_token_cache(
            teacher, random_examples(3, V, 0), tmp_path, fingerprint={"vocab_hash": student_hash}
        )


def test_generate_greedy_matches_argmax_and_sampling_is_seeded(tmp_path):
    model, args = tiny_model(V, seed=2, scale=1.0)  # a flat model: varied, non-repeating text
    teacher = LocalTeacher(save_teacher(tmp_path, model, args, tiny_tokenizer(V)))
    prompts = ["t5 t9 t33 t2", "t7", "t40 t41 t42 t43 t44 t45 t46"]  # left padding in a batch
    outs = teacher.generate(prompts, max_tokens=6)
    eos = teacher.tokenizer.eos_token_id
    for prompt, out in zip(prompts, outs):
        ids = list(teacher.tokenizer.encode(prompt))
        chain = []
        while len(chain) < 6:
            nxt = int(mx.argmax(model(mx.array([ids + chain]))[0, -1]).item())
            if nxt == eos:
                break
            chain.append(nxt)
        assert out.ok and out.usage == {"prompt_tokens": len(ids), "completion_tokens": len(chain)}
        assert out.finish_reason == ("length" if len(chain) == 6 else "stop")
        assert out.text.split() == [f"t{i}" for i in chain]
    assert len({tuple(c.text.split()) for c in outs}) == 3
    assert any(len(set(c.text.split())) > 1 for c in outs)
    a = teacher.generate(prompts, max_tokens=8, temperature=1.0, seed=3)
    b = teacher.generate(prompts, max_tokens=8, temperature=1.0, seed=3)
    c = teacher.generate(prompts, max_tokens=8, temperature=1.0, seed=4)
    assert [x.text for x in a] == [x.text for x in b] != [x.text for x in c]


def test_bad_folder(tmp_path):
    with pytest.raises(BadInput, match="no config.json"):
        LocalTeacher(tmp_path)


def test_version_hash_tracks_weights_in_any_dtype():
    model, _ = tiny_model(V, seed=8)
    model.set_dtype(mx.bfloat16)
    tok = tiny_tokenizer(V)
    before = LocalTeacher((model, tok)).version
    assert LocalTeacher((model, tok)).version == before
    w = model.model.norm.weight
    model.model.norm.weight = mx.concatenate([w[:1] + 1, w[1:]])
    assert LocalTeacher((model, tok)).version != before
