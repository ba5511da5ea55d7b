"""The LM-head contract on dense architectures, against each model's own `model(tokens)` logits.

For 20 dense architectures (each transform of the table among them): a tiny random model (tied
and untied where the architecture allows, 4-bit and 8-bit affine, mxfp4 for a few) with its head
scaled so logits spread widely,
saved as an mlx-lm folder and loaded back with `models.load_model`. The trainer's own loss
function (fused head + transform) must match the same loss computed on mlx-lm's materialized
logits: CE, forward KL to dense and to top-k targets, and the gradients of every trainable
parameter (CE and top-k KD), within 1e-4 relative.

`python tests/test_heads.py` prints the table of measured errors.
"""

from __future__ import annotations

import contextlib
import io

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import arithmetic_tokenizer

from mlx_distill.errors import BadInput
from mlx_distill.kernels import DenseTargets, SparseTargets, distill_loss
from mlx_distill.models import (
    from_teacher_layers,
    head_inputs,
    lm_head,
    load_model,
    model_from_config,
    save_model,
    text_model,
)
from mlx_distill.recipe import LossConfig
from mlx_distill.train.loss import make_loss

TOL = 1e-4
V = 160  # more rows than the 120-id tokenizer: padded vocabularies, as real models have
BASE = dict(
    hidden_size=64,
    num_hidden_layers=3,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    layer_norm_eps=1e-5,
    norm_epsilon=1e-5,
    vocab_size=V,
    rope_theta=10000.0,
    max_position_embeddings=128,
)
GEMMA3 = dict(sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16)
EXTRA = {
    "gemma2": dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": GEMMA3,
    "cohere": dict(logit_scale=4.0),
    "granite": dict(
        logits_scaling=0.25,
        attention_multiplier=0.25,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_bias=False,
        mlp_bias=False,
    ),
    "smollm3": dict(no_rope_layer_interval=2),
    "phi": dict(partial_rotary_factor=0.5, num_key_value_heads=4),
    "starcoder2": dict(use_bias=True),
    "minicpm": dict(dim_model_base=16, scale_depth=1.4, scale_emb=2.0),
    "stablelm": dict(use_qkv_bias=False, partial_rotary_factor=0.5),
    "internlm2": dict(bias=False),
}
ALWAYS_TIED = {"gemma", "gemma2", "cohere", "gpt2"}
NEVER_TIED = {"phi", "stablelm"}
# mlx-lm 0.32 cannot load a tied MiniCPM folder (its sanitize adds an lm_head the model lacks)
NO_TIED = NEVER_TIED | {"minicpm"}
MXFP4 = {"llama", "gemma2", "phi", "qwen3"}
# layer kinds that depend on the position (sliding/global, linear/full attention)
POSITIONAL = {"gemma3_text", "gemma3", "qwen3_5"}


def config_for(arch: str, tied: bool) -> dict:
    if arch == "gemma3":
        text = dict(BASE, model_type="gemma3_text", **GEMMA3)
        return dict(model_type="gemma3", text_config=text, vocab_size=V)
    if arch == "qwen3_5":
        text = dict(
            BASE,
            model_type="qwen3_5_text",
            tie_word_embeddings=tied,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            full_attention_interval=2,
            rope_parameters={
                "type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1],
            },
        )
        return dict(model_type="qwen3_5", text_config=text, tie_word_embeddings=tied)
    if arch == "gpt2":
        return dict(
            model_type="gpt2",
            n_ctx=128,
            n_embd=64,
            n_head=4,
            n_layer=3,
            n_positions=128,
            layer_norm_epsilon=1e-5,
            vocab_size=V,
        )
    return dict(BASE, model_type=arch, tie_word_embeddings=tied, **EXTRA.get(arch, {}))


def _variants(arch: str) -> list[str]:
    out = [] if arch in NO_TIED else ["tied"]
    if arch not in ALWAYS_TIED:
        out.append("untied")
    out += ["q4", "q8"] + (["mxfp4"] if arch in MXFP4 else [])
    return out


# the dense architectures with a transform each, tied/untied and quantized variants (the
# mixture-of-experts and hybrid ones: tests/test_architectures.py)
DENSE = (
    "cohere gemma gemma2 gemma3 gemma3_text gpt2 granite internlm2 llama minicpm mistral olmo2 "
    "phi phi3 qwen2 qwen3 qwen3_5 smollm3 stablelm starcoder2"
).split()
CASES = [(arch, v) for arch in DENSE for v in _variants(arch)]


def _spread_head(model: nn.Module, tokens: mx.array, target: float) -> None:
    """Scale the head (or tied embedding) so that max |logit| is about `target`."""
    lm = text_model(model)
    name = next((n for n in ("lm_head", "output") if n in lm), None)
    owner = lm if name else lm.model
    name = name or next(n for n in ("embed_tokens", "wte", "tok_embeddings") if n in lm.model)
    for _ in range(2):  # a tied embedding also scales the input: repeat once
        peak = mx.abs(model(tokens)).max().item()
        owner[name].weight = owner[name].weight * (target / peak)


def build_case(arch: str, variant: str, tokenizer_dir, tmp_path, seed: int):
    """A saved-and-reloaded model of `arch` in `variant` (tied/untied/q4/q8/mxfp4)."""
    from mlx_lm.utils import quantize_model

    mx.random.seed(seed)
    tied = variant == "tied" or arch in ALWAYS_TIED  # quantized variants: untied where possible
    config = config_for(arch, tied)
    model = model_from_config(config)
    if tied and arch in ("gemma3_text", "gemma3"):
        text_model(model).pop("lm_head")  # saved without lm_head: mlx-lm's sanitize ties it
        text_model(model).tie_word_embeddings = True
    tokens = mx.array(np.random.default_rng(seed).integers(0, V, (2, 11)), dtype=mx.int32)
    # wide logits: beyond the softcap for Gemma 2 (30), tens elsewhere
    _spread_head(model, tokens, 90.0 if arch == "gemma2" else 30.0)
    mx.eval(model.parameters())
    if variant in ("q4", "q8", "mxfp4"):
        bits = 8 if variant == "q8" else 4
        mode = "mxfp4" if variant == "mxfp4" else "affine"
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, 32, bits, mode=mode)
    path = save_model(model, config, tokenizer_dir, tmp_path / f"{arch}-{variant}")
    loaded, _, _ = load_model(path)
    return loaded, tokens


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# The decay parameters of a gated-delta (linear attention) recurrence get their gradient through
# a long product of exponentials: fp32 rounding in dL/dh (fused head vs materialized logits, both
# fp32) reaches them with cancellation. Measured: 3.9e-4 relative on Qwen3.5's `A_log` (untied,
# seed 1272462974), every other parameter of that case below 5e-5.
RECURRENT_DECAY = ("A_log", "dt_bias")


# A gradient that is zero up to rounding (Gemma 4's last `layer_scalar` scales the residual
# stream just before the final RMS norm, which undoes the scale: measured 5e-7 beside O(1)
# elsewhere) is compared to the whole gradient's norm rather than its own.
ZERO_GRADIENT = 1e-6


def _grad_err(g: dict, ref: dict) -> float:
    """Worst per-parameter relative error; a recurrent decay's counts a tenth (10x TOL)."""
    norms = {key: mx.linalg.norm(want.reshape(-1)).item() for key, want in ref.items()}
    total = float(np.sqrt(sum(n * n for n in norms.values())))
    worst = 0.0
    for key, want in ref.items():
        num = mx.linalg.norm((g[key] - want).reshape(-1)).item()
        den = norms[key] if norms[key] >= ZERO_GRADIENT * total else total
        scale = 10.0 if key.rsplit(".", 1)[-1] in RECURRENT_DECAY else 1.0
        worst = max(worst, num / max(den, 1e-12) / scale)
    return worst


def measure(model, tokens, seed: int) -> dict:
    """Relative errors of the fused head path against mlx-lm's own logits."""
    rng = np.random.default_rng([seed, 1])  # not the tokens' stream: labels != inputs
    B, L = tokens.shape
    labels = mx.array(rng.integers(0, V, (B, L)), dtype=mx.int32)
    mask = mx.array(rng.random((B, L)) > 0.2)
    k = 6
    t = rng.normal(size=(B, L, V)) * 3.0
    ids = np.argsort(-t, axis=-1)[..., :k].astype(np.int32)
    logp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    lp = mx.array(np.take_along_axis(logp, ids, -1) * 1.0, dtype=mx.float32)
    ids = mx.array(ids)
    dense = DenseTargets(mx.array(t, dtype=mx.float32))
    eye = mx.eye(V)
    kd_cfg = LossConfig(kind="forward_kl", kd_weight=0.7, temperature=2.0, chunk_size=5)
    kd_kw = dict(kind="forward_kl", temperature=2.0, kd_weight=0.7, labels=labels, mask=mask)

    def ref_ce(m):
        z = m(tokens).astype(mx.float32)
        ce = mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, labels[..., None], -1)[..., 0]
        return mx.sum(mx.where(mask, ce, 0.0)) / mx.sum(mask)

    def ref_kd(m):  # the plain loss on mlx-lm's materialized logits (identity head)
        z = m(tokens).astype(mx.float32)
        return distill_loss(z, eye, SparseTargets(ids, lp), chunk_size=5, **kd_kw)[0]

    ce_fn, kd_fn = make_loss(LossConfig(chunk_size=5)), make_loss(kd_cfg)

    def ours_ce(m):
        return ce_fn(m, tokens, labels, mask, None, None)[0]

    def ours_kd(m):
        return kd_fn(m, tokens, labels, mask, ids, lp)[0]

    out = {}
    for name, ours, ref in (("ce", ours_ce, ref_ce), ("kd_topk", ours_kd, ref_kd)):
        a, ga = nn.value_and_grad(model, ours)(model)
        b, gb = nn.value_and_grad(model, ref)(model)
        out[name] = _rel(a.item(), b.item())
        out[f"grad_{name}"] = _grad_err(dict(tree_flatten(ga)), dict(tree_flatten(gb)))
    hidden, head = head_inputs(model, tokens)
    z = model(tokens).astype(mx.float32)
    fused = distill_loss(
        hidden, head.weight, dense, transform=head.transform, chunk_size=5, **kd_kw
    )
    plain = distill_loss(z, eye, dense, chunk_size=5, **kd_kw)
    out["kd_dense"] = _rel(fused[0].item(), plain[0].item())
    out["n_trainable"] = len(tree_flatten(model.trainable_parameters()))
    return out


@pytest.mark.parametrize("arch,variant", CASES)
def test_head_matches_model_logits(arch, variant, tokenizer_dir, tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    model, tokens = build_case(arch, variant, tokenizer_dir, tmp_path, seed)
    head = lm_head(model)
    if variant == "mxfp4":
        assert head.weight.mode == "mxfp4"
    errs = measure(model, tokens, seed)
    assert errs["n_trainable"] > 0
    bad = {k: v for k, v in errs.items() if k != "n_trainable" and not v <= TOL}
    assert not bad, f"{arch}/{variant} seed {seed}: {bad}"


@pytest.mark.parametrize("arch", DENSE)
def test_from_teacher_layers_every_arch(arch):
    mx.random.seed(0)
    tied = arch not in NO_TIED
    config = config_for(arch, tied)
    teacher = model_from_config(config)
    mx.eval(teacher.parameters())
    tokens = mx.array([[1, 5, 9, 2, 7]], dtype=mx.int32)
    if arch in POSITIONAL:  # layer 2 would move to position 1, which has another kind
        with pytest.raises(BadInput, match="another kind"):
            from_teacher_layers(teacher, config, stride=2, layers=[0, 2])
        keep = [0, 1]
    else:
        keep = [0, 2]
    student, student_config = from_teacher_layers(teacher, config, stride=2, layers=keep)
    t_params = dict(tree_flatten(teacher.parameters()))
    s_params = dict(tree_flatten(student.parameters()))
    assert len(s_params) < len(t_params)
    for key, value in s_params.items():
        for j, i in enumerate(keep):  # map the student's layer index back to the teacher's
            for marker in (".layers.", ".h."):
                key = key.replace(f"{marker}{j}.", f"{marker}@{i}.")
        want = t_params[key.replace("@", "")]
        assert mx.array_equal(value, want).item(), key
    assert student(tokens).shape == (1, 5, V)
    # the head contract sees the same head in the student
    assert lm_head(student).weight.shape == lm_head(teacher).weight.shape


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        tok = arithmetic_tokenizer(Path(tmp) / "tok")
        cols = ("ce", "kd_dense", "kd_topk", "grad_ce", "grad_kd_topk")
        print("| arch | variant | transform | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 3) + "|")
        for arch, variant in CASES:
            model, tokens = build_case(arch, variant, tok, Path(tmp), 0)
            tf = lm_head(model).transform
            desc = []
            if tf is not None:
                if tf.scale != 1.0:
                    desc.append(f"scale {tf.scale:g}")
                if tf.softcap is not None:
                    desc.append(f"softcap {tf.softcap:g}")
                if tf.bias is not None:
                    desc.append("bias")
            errs = measure(model, tokens, 0)
            row = " | ".join(f"{errs[c]:.1e}" for c in cols)
            print(f"| {arch} | {variant} | {', '.join(desc) or '-'} | {row} |")
