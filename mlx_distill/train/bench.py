"""`mlx-distill bench step`: one training step of this project against mlx-lm's own.

Same random-weight model with real shapes (Qwen2.5-0.5B's: d=896, 14 heads, 2 KV heads,
intermediate 4864, V=151,936, tied; fewer layers so it runs anywhere), same batch and sequence
length, each variant in its own process so that peaks do not mix:
  mlx_lm: mlx-lm's training step (`tuner.trainer.default_loss`: full logits, compiled step);
  ce:     this project's CE step (the baseline), `distill_loss` on the fused head;
  kd:     its KD step on cached top-k targets (forward KL with CE, kd_weight 0.5);
each with full fine-tuning and with LoRA (mlx-lm's own adapter layers in every variant).
Reported per variant: tokens/s (median step after a warm-up step) and peak memory; ratios
against mlx-lm's; `mlx-distill plan`'s predicted peak for the ce and kd steps; and the KD step's
memory floor (weights, trainable weights' gradients and
optimizer state, one loss chunk's buffers, the activations the backward pass keeps).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

QWEN25_05B = dict(
    arch="qwen2",
    hidden_size=896,
    num_heads=14,
    num_kv_heads=2,
    intermediate_size=4864,
    tie_embeddings=True,
    max_position=32768,
    rope_theta=1000000.0,
)
VOCAB = 151_936
LORA = dict(rank=8, scale=20.0)


def _model(cfg: dict, train: str):
    import mlx.core as mx

    from mlx_distill.models import build_model
    from mlx_distill.models.adapters import apply_adapters
    from mlx_distill.recipe import LoraConfig, ModelConfig, StudentConfig

    mx.random.seed(0)
    model_cfg = ModelConfig(**QWEN25_05B, num_layers=cfg["layers"])
    model, config = build_model(model_cfg, cfg["vocab"])
    student = StudentConfig(train=train, lora=LoraConfig(**LORA))
    apply_adapters(model, student)
    return model, config, student


def _batch(cfg: dict):
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    B, L, V, k = cfg["batch"], cfg["seq"], cfg["vocab"], cfg["k"]
    seqs = mx.array(rng.integers(0, V, (B, L + 1)), dtype=mx.int32)
    ids = mx.array(rng.integers(0, V, (B, L, k)), dtype=mx.int32)
    probs = rng.dirichlet(np.ones(k), (B, L)) * 0.95  # top-k mass 0.95, the rest in the tail
    logprobs = mx.array(np.log(probs), dtype=mx.float32)
    return seqs, ids, logprobs


def _mlx_lm_step(model, optimizer, cfg):
    """mlx-lm's `tuner.trainer.train` step, as written there (grad accumulation 1)."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint

    if cfg["grad_checkpoint"]:
        grad_checkpoint(model.layers[0])
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (lvalue, toks), grad = loss_value_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return lvalue, toks

    seqs = _batch(cfg)[0]
    lengths = mx.array([[1, cfg["seq"]]] * cfg["batch"], dtype=mx.int32)
    return lambda: step(seqs, lengths), state


def _project_step(model, optimizer, cfg, kd: bool):
    """The trainer's own step (`step.make_step`) with its loss (`loss.make_loss`)."""
    import mlx.core as mx

    from mlx_distill.recipe import LossConfig, TrainConfig
    from mlx_distill.train.loss import make_loss
    from mlx_distill.train.recompute import checkpoint_blocks
    from mlx_distill.train.step import make_step

    loss_cfg = LossConfig(kind="forward_kl", kd_weight=0.5) if kd else None
    train_cfg = TrainConfig(batch_size=cfg["batch"], grad_clip=0.0)
    step = make_step(model, optimizer, make_loss(loss_cfg), train_cfg)
    if cfg["grad_checkpoint"]:
        checkpoint_blocks(model)
    seqs, ids, logprobs = _batch(cfg)
    mask = mx.ones((cfg["batch"], cfg["seq"]), dtype=mx.bool_)
    arrays = (seqs[:, :-1], seqs[:, 1:], mask, ids if kd else None, logprobs if kd else None)
    return lambda: step(arrays), [model.state, optimizer.state]


def run_variant(cfg: dict) -> dict:
    """One variant in this process: median seconds per step and peak bytes."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    model, _, _ = _model(cfg, cfg["train"])
    optimizer = optim.AdamW(learning_rate=1e-5)
    if cfg["variant"] == "mlx_lm":
        run, state = _mlx_lm_step(model, optimizer, cfg)
    else:
        run, state = _project_step(model, optimizer, cfg, kd=cfg["variant"] == "kd")
    model.train()
    times, peak = [], 0
    for i in range(cfg["steps"] + 1):  # step 0: compilation and first allocations
        mx.eval(state)
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        mx.eval(run(), state)
        if i > 0:
            times.append(time.perf_counter() - t0)
        peak = max(peak, mx.get_peak_memory())
    seconds = float(np.median(times))
    return {
        "seconds_per_step": seconds,
        "tokens_per_s": cfg["batch"] * cfg["seq"] / seconds,
        "peak_bytes": int(peak),
    }


def _shape(cfg: dict, train: str):
    """plan.Shape of the bench model (a lazy skeleton: only shapes are read)."""
    import mlx.core as mx

    from mlx_distill import plan
    from mlx_distill.models import model_config_dict, model_from_config
    from mlx_distill.models.adapters import apply_adapters
    from mlx_distill.recipe import LoraConfig, ModelConfig, StudentConfig

    config = model_config_dict(ModelConfig(**QWEN25_05B, num_layers=cfg["layers"]), cfg["vocab"])
    model = model_from_config(config)
    apply_adapters(model, StudentConfig(train=train, lora=LoraConfig(**LORA)))
    return plan.shape_of(model, config, mx.float32)


def plan_peak(cfg: dict, train: str, kd: bool) -> int:
    """`mlx-distill plan`'s predicted peak for this project's step (variant ce or kd)."""
    from mlx_distill import plan

    terms = plan.train_terms(
        _shape(cfg, train),
        batch=cfg["batch"],
        seq=cfg["seq"],
        k=cfg["k"] if kd else 0,
        kd=kd,
        grad_checkpoint=cfg["grad_checkpoint"],
    )
    return sum(terms.values())


def kd_floor(cfg: dict, train: str) -> dict:
    """The KD step's memory floor by term (plan.train_terms' pieces that cannot go away)."""
    from mlx_distill import plan

    s = _shape(cfg, train)
    tokens = cfg["batch"] * cfg["seq"]
    if cfg["grad_checkpoint"]:
        acts = tokens * s.d * 4 * s.layers + plan._block_act(s, tokens, cfg["seq"], 4)
    else:
        acts = plan._block_act(s, tokens, cfg["seq"], 4) * s.layers
    chunk = plan.loss_chunk(tokens, s.vocab, None, False)
    floor = {
        "weights": s.weight_bytes,
        "gradients": s.trainable * 4,
        "optimizer": 8 * s.trainable,
        "loss_chunk": int(plan.CHUNK_BUFFERS * chunk * s.vocab * 4),
        "activations": acts,
    }
    return {"bytes": sum(floor.values()), "terms": floor}


def bench_step(
    layers: int = 2,
    batch: int = 4,
    seq: int = 1024,
    k: int = 32,
    steps: int = 2,
    vocab: int = VOCAB,
    grad_checkpoint: bool = False,
    trains: tuple[str, ...] = ("full", "lora"),
    variants: tuple[str, ...] = ("mlx_lm", "ce", "kd"),
) -> dict:
    """Run every (train, variant) in its own process; tokens/s, peaks, ratios, KD floor."""
    base = dict(layers=layers, batch=batch, seq=seq, k=k, steps=steps, vocab=vocab)
    base["grad_checkpoint"] = grad_checkpoint
    out: dict = {
        "model": dict(QWEN25_05B, num_layers=layers, vocab_size=vocab),
        "batch": [batch, seq],
        "tokens_per_step": batch * seq,
        "k": k,
        "lora": LORA,
        "grad_checkpoint": grad_checkpoint,
        "steps_timed": steps,
    }
    for train in trains:
        rows: dict = {}
        for variant in variants:
            cfg = dict(base, train=train, variant=variant)
            proc = subprocess.run(
                [sys.executable, "-m", "mlx_distill.train.bench", json.dumps(cfg)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"bench step {train}/{variant} failed: {proc.stderr[-1500:]}")
            rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        if "mlx_lm" in rows:
            ref = rows["mlx_lm"]
            for variant in [v for v in variants if v != "mlx_lm"]:
                r = rows[variant]
                r["tokens_per_s_vs_mlx_lm"] = r["tokens_per_s"] / ref["tokens_per_s"]
                r["peak_vs_mlx_lm"] = r["peak_bytes"] / ref["peak_bytes"]
        for variant in [v for v in ("ce", "kd") if v in rows]:
            r = rows[variant]
            r["plan_peak_bytes"] = plan_peak(base, train, kd=variant == "kd")
            r["plan_vs_measured"] = r["plan_peak_bytes"] / r["peak_bytes"]
        if "kd" in rows:
            floor = kd_floor(base, train)
            rows["kd_floor"] = floor
            rows["kd"]["peak_vs_floor"] = rows["kd"]["peak_bytes"] / floor["bytes"]
        out[train] = rows
    return out


if __name__ == "__main__":
    from mlx_distill import backend

    backend.setup()  # the fast BLAS before mlx.core

    print(json.dumps(run_variant(json.loads(sys.argv[1]))))
