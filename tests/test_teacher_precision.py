"""A local teacher scores through the LM-head contract, in float32 on the CPU backend."""

from __future__ import annotations

import contextlib
import io

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import vocab_of

from mlx_distill import backend
from mlx_distill.models import build_model, head_inputs, save_model
from mlx_distill.recipe import ModelConfig
from mlx_distill.teachers.local import LocalTeacher
from mlx_distill.text.examples import TokenizedExample

pytestmark = pytest.mark.skipif(backend.device() != "cpu", reason="CPU-backend behaviour")


def _examples(vocab: int) -> list[TokenizedExample]:
    rng = np.random.default_rng(0)
    out = []
    for n in (9, 6):
        tokens = rng.integers(0, vocab, n).astype(np.int32)
        mask = np.zeros(n, bool)
        mask[3:] = True
        out.append(TokenizedExample(tokens, mask))
    return out


@pytest.mark.parametrize("variant", ["bf16", "q4"])
def test_low_precision_teacher_scores_in_fp32(variant, tokenizer_dir, tmp_path, capsys):
    from mlx_lm.utils import quantize_model

    vocab = vocab_of(tokenizer_dir)
    cfg = ModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    model, config = build_model(cfg, vocab)
    if variant == "bf16":
        model.set_dtype(mx.bfloat16)
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, 32, 4)
    path = save_model(model, config, tokenizer_dir, tmp_path / variant)
    # what the teacher computed before: its own model(tokens), in its own precision
    tokens = mx.array(_examples(vocab)[0].tokens[None])
    before = model(tokens).astype(mx.float32)

    teacher = LocalTeacher(path)
    line = capsys.readouterr().err
    assert "scoring in float32 on the CPU backend" in line
    assert ("dequantized from 4-bit" if variant == "q4" else "cast from bfloat16") in line
    params = tree_flatten(teacher.model.parameters())
    assert all(v.dtype == mx.float32 for _, v in params)
    assert not any(k.endswith(".scales") for k, _ in params)
    after = teacher._logits(tokens)
    # the same function up to bf16 rounding of the activations (dequantization is exact)
    tol = 0.05 if variant == "bf16" else 1e-4
    assert mx.abs(after - before).max().item() <= tol * mx.abs(before).max().item()
    hidden, head = head_inputs(teacher.model, tokens)
    assert mx.array_equal(after, head.logits(hidden)).item()
    rows = teacher.score(_examples(vocab), k=4)
    assert [len(r.counts) for r in rows] == [6, 3]  # positions t with mask[t + 1] only

    quiet = LocalTeacher(path, cpu_fp32=False)
    assert capsys.readouterr().err == ""
    assert quiet.version == teacher.version  # the fingerprint is the weights as stored
