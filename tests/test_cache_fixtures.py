"""Tiny teachers and examples shared by the cache, loader and local-teacher tests (no tests)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_distill.text.examples import TokenizedExample


def tiny_tokenizer(size: int):
    """An HF fast tokenizer with `size` word-level tokens: t0 ... t{size-1}, t0 unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1")


def tiny_model(vocab_rows: int, seed: int = 0, hidden: int = 32, scale: float = 6.0):
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=2,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab_rows,
        tie_word_embeddings=True,
    )
    model = llama.Model(args)
    # scale > 1: larger logits than the default init, a peaked, teacher-like distribution
    model.update({"model": {"embed_tokens": {"weight": model.model.embed_tokens.weight * scale}}})
    mx.eval(model.parameters())
    return model, args


def save_teacher(path: Path, model, args, tokenizer, quantize_bits: int | None = None) -> Path:
    """Write an mlx-lm folder (config.json, model.safetensors, tokenizer files)."""
    import dataclasses

    from mlx_lm.utils import quantize_model, save_config, save_model

    config = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
    if quantize_bits:
        model, config = quantize_model(model, config, group_size=32, bits=quantize_bits)
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model, donate_model=False)
    save_config(config, path / "config.json")
    tokenizer.save_pretrained(path)
    return path


def random_examples(n: int, vocab: int, seed: int, lo: int = 3, hi: int = 40):
    """n examples of random length with a prompt part (mask False) and an answer part."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = int(rng.integers(lo, hi))
        tokens = rng.integers(0, vocab, T)
        mask = np.zeros(T, dtype=bool)
        mask[int(rng.integers(1, T)) :] = True
        out.append(TokenizedExample(tokens, mask, {"id": i, "prompt": f"p{i}"}))
    return out
