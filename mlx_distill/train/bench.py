"""`mlx-distill bench step`: training-step throughput, KD (sparse top-k targets) vs hard labels.

Times the compiled step of `trainer.train` on a quickstart-sized student with random tokens and
random top-k targets, median of several steps after warm-up, so the KD overhead is a ratio
measured in one process.
"""

from __future__ import annotations

import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_distill.cache.loader import Batch
from mlx_distill.kernels import SparseTargets
from mlx_distill.models import build_model
from mlx_distill.recipe import LossConfig, ModelConfig
from mlx_distill.train.trainer import make_loss


def _time_steps(model, batch: Batch, loss_cfg: LossConfig | None, steps: int) -> float:
    """Median seconds of the trainer's compiled step (same loss function, same optimizer)."""
    optimizer = optim.AdamW(learning_rate=1e-3)
    state = [model.state, optimizer.state]
    grad_fn = nn.value_and_grad(model, make_loss(loss_cfg))

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens, labels, mask, ids, logprobs):
        (loss, _), grads = grad_fn(model, tokens, labels, mask, ids, logprobs)
        optimizer.update(model, grads)
        return loss

    ids = batch.targets.ids if batch.targets is not None else None
    lps = batch.targets.logprobs if batch.targets is not None else None
    times = []
    for i in range(steps + 2):  # two warm-up steps: compilation and first allocations
        t0 = time.perf_counter()
        mx.eval(step(batch.tokens, batch.labels, batch.mask, ids, lps), state)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_step(
    batch_size: int = 32, seq_len: int = 128, vocab: int = 385, k: int = 16, steps: int = 8
) -> dict:
    """Tokens/s of a KD step and a CE step on the quickstart student; their ratio."""
    rng = np.random.default_rng(0)
    cfg = ModelConfig(
        hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=352
    )
    tokens = mx.array(rng.integers(0, vocab, (batch_size, seq_len)), dtype=mx.int32)
    labels = mx.array(rng.integers(0, vocab, (batch_size, seq_len)), dtype=mx.int32)
    mask = mx.ones((batch_size, seq_len), dtype=mx.bool_)
    ids = mx.array(rng.integers(0, vocab, (batch_size, seq_len, k)), dtype=mx.int32)
    logits = rng.normal(size=(batch_size, seq_len, k)) * 2
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True) * 1.25)
    targets = SparseTargets(ids, mx.array(logprobs, dtype=mx.float32))
    out = {"batch": [batch_size, seq_len], "vocab": vocab, "k": k, "steps_timed": steps}
    for name, loss_cfg, t in (
        ("ce", None, None),
        ("kd", LossConfig(kind="forward_kl", kd_weight=0.5), targets),
    ):
        mx.random.seed(0)
        model, _ = build_model(cfg, vocab)
        seconds = _time_steps(model, Batch(tokens, labels, mask, t), loss_cfg, steps)
        out[name] = {"seconds_per_step": seconds, "tokens_per_s": batch_size * seq_len / seconds}
    out["kd_over_ce_time"] = out["kd"]["seconds_per_step"] / out["ce"]["seconds_per_step"]
    return out
