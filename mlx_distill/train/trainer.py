"""The training loop shared by the teacher, the distilled student and the baseline.

One step (`step.make_step`): student hidden states -> `distill_loss` (KD against cached teacher
targets mixed with CE, or CE alone for the baseline) -> AdamW, optionally over `grad_accum`
micro-batches, with fp32 master weights when `train.dtype` is not float32, and with every block
checkpointed when `train.grad_checkpoint`. `mx.eval` runs once per step, outside the compiled
function. Checkpoints hold the trainable weights (the fp32 masters when there are any), the
optimizer state and the loader position, so a killed run resumes at the exact batch it stopped at.
In an `mx.distributed` group (see `distributed`) every rank runs this loop on its rows of each
global batch; rank 0 alone writes metrics and checkpoints, and every rank resumes from the
checkpoint rank 0 picks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlx_distill.kernels import SparseTargets
from mlx_distill.models import head_inputs
from mlx_distill.models.adapters import head_trains
from mlx_distill.recipe import LossConfig, TrainConfig
from mlx_distill.train import distributed
from mlx_distill.train.recompute import checkpoint_blocks
from mlx_distill.train.step import batch_arrays, make_master, make_step, master_to_model

KEEP_CHECKPOINTS = 2


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    final_loss: float
    resumed_from: int
    allreduce_s: float | None = None  # in a group: one all-reduce of the gradient, median


def schedule(cfg: TrainConfig):
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    warmup = max(1, min(cfg.warmup, cfg.steps - 1))
    decay = optim.cosine_decay(cfg.lr, max(1, cfg.steps - warmup), cfg.lr * cfg.min_lr_ratio)
    return optim.join_schedules(
        [optim.linear_schedule(cfg.lr / warmup, cfg.lr, warmup), decay], [warmup]
    )


def make_loss(loss_cfg: LossConfig | None):
    """The per-batch loss; `loss_cfg=None` means hard labels only (cross-entropy)."""

    def loss_fn(model, tokens, labels, mask, ids, logprobs):
        # the LM-head contract: weight wherever the architecture keeps it, plus its transform
        hidden, head = head_inputs(model, tokens)
        # A frozen head (LoRA on other layers, or a LoRA head's base) needs no (V, d) gradient.
        weight_grad = head.adapter is None and head_trains(model)
        if loss_cfg is None or ids is None:
            return head.loss(
                hidden, None, kind="ce", labels=labels, mask=mask, weight_grad=weight_grad
            )
        return head.loss(
            hidden,
            SparseTargets(ids, logprobs),
            kind=loss_cfg.kind,
            beta=loss_cfg.beta,
            temperature=loss_cfg.temperature,
            tail=loss_cfg.tail,
            labels=labels if loss_cfg.kd_weight < 1.0 else None,
            kd_weight=loss_cfg.kd_weight,
            mask=mask,
            chunk_size=loss_cfg.chunk_size,
            weight_grad=weight_grad,
        )

    return loss_fn


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.json").exists())
    return found[-1] if found else None


def _trained_weights(model, master) -> dict:
    """What a checkpoint must hold to resume: the trainable weights (fp32 masters if any)."""
    return dict(tree_flatten(master["params"] if master else model.trainable_parameters()))


def _save_checkpoint(
    ckpt_dir: Path, step: int, model, optimizer, loader, fingerprint: str, master=None
) -> None:
    """Write checkpoints/step-NNNNNN atomically; keep the newest KEEP_CHECKPOINTS."""
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), _trained_weights(model, master))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    state = {"step": step, "fingerprint": fingerprint, "loader": loader.state_dict()}
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(ckpt_dir.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def _restore(ckpt: Path, model, optimizer, loader, master=None) -> int:
    state = json.loads((ckpt / "state.json").read_text())
    weights = mx.load(str(ckpt / "model.safetensors"))
    if master is not None:
        master["params"] = tree_unflatten(list(weights.items()))
        master_to_model(model, master)
    else:  # frozen (adapter-base) weights are not in the checkpoint: they never change
        model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    loader.load_state_dict(state["loader"])
    return int(state["step"])


def _postfix(record: dict, split: bool) -> dict:
    """The progress bar's loss, and with an on-policy source generation, teacher scoring and
    the training step apart (samples/s and tokens/s of each)."""
    postfix = {"loss": f"{record['loss']:.3f}"}
    if split:
        for part in ("gen", "score", "train"):
            samples, tokens = record[f"{part}_samples_per_s"], record[f"{part}_tokens_per_s"]
            postfix[part] = f"{samples:.1f}samp/s {tokens:.0f}tok/s"
    return postfix


def train(
    model: nn.Module,
    loader,
    cfg: TrainConfig,
    loss_cfg: LossConfig | None,
    *,
    run: str,
    metrics_path: Path,
    ckpt_dir: Path,
    fingerprint: str,
    seed: int = 0,
    progress: bool = True,
    bar_position: int = 0,
    validate: Callable[[nn.Module], float] | None = None,
    extra_losses: dict[str, Callable] | None = None,
) -> TrainResult:
    """Train `model` for cfg.steps batches from `loader`; resume from `ckpt_dir` if it matches.

    `loader` is any batch source with `__next__`, `state_dict` and `load_state_dict` (the cache
    `Loader`, or `onpolicy.OnPolicySource`). A batch with a `loss` field naming an entry of
    `extra_losses` ({name: loss_fn(model, tokens, labels, mask, ids, logprobs)}) is trained with
    that loss; other batches with `loss_cfg`'s.

    Logs {"run", "step", "loss", "ce", "kd", "covered_mass", "lr", "tokens_per_s",
    "train_tokens_per_s", "train_samples_per_s", "peak_memory_bytes"} (the two samples/tokens
    rates timed over the training step alone; the peak is MLX's since training started, what
    `plan` predicts; plus the source's `stats()`, if it has one) to `metrics_path` every
    cfg.log_every steps, and {"run", "step", "valid_loss"} from `validate(model)` every
    cfg.eval_every steps and after the last step.
    """
    from tqdm import tqdm

    mx.random.seed(seed)
    dtype = getattr(mx, cfg.dtype)
    model.set_dtype(dtype)  # a bf16 checkpoint trains in fp32 when the recipe says float32
    # Below fp32 the model computes in `dtype`; AdamW updates fp32 master weights.
    master = make_master(model) if dtype != mx.float32 else None
    optimizer = optim.AdamW(learning_rate=schedule(cfg), weight_decay=cfg.weight_decay)
    optimizer.init(master["params"] if master else model.trainable_parameters())
    loss_fn = make_loss(loss_cfg)

    start = 0
    main = distributed.is_main()  # in a distributed group only rank 0 writes files
    ckpt = _latest_checkpoint(ckpt_dir) if main else None
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("fingerprint") != fingerprint:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            ckpt = None
    # Every rank resumes from the checkpoint rank 0 picked.
    ckpt = distributed.broadcast(str(ckpt) if ckpt else None)
    if ckpt is not None:
        start = _restore(Path(ckpt), model, optimizer, loader, master)
    distributed.check_same(
        f"{run}: starting weights", distributed.weights_digest(model.trainable_parameters())
    )
    if main and metrics_path.exists():
        # Keep other runs' lines and this run's lines up to the step it resumes from.
        # Rewritten only when there is something to drop: another run may be appending to the
        # same file from a side process (see stages._spawn_side).
        lines = metrics_path.read_text().splitlines()
        kept = []
        for line in lines:
            record = json.loads(line)
            if record["run"] != run or record["step"] <= start:
                kept.append(line)
        if len(kept) < len(lines):
            metrics_path.write_text("".join(line + "\n" for line in kept))

    state = [model.state, optimizer.state] + ([master] if master else [])
    steps = {None: make_step(model, optimizer, loss_fn, cfg, master)}
    for name, fn in (extra_losses or {}).items():
        steps[name] = make_step(model, optimizer, fn, cfg, master)
    restore = checkpoint_blocks(model) if cfg.grad_checkpoint else None
    model.train()
    mx.reset_peak_memory()  # the metrics' peak is the training's, not an earlier stage's
    t0 = time.perf_counter()
    tokens_seen, window_tokens, window_t0 = 0, 0, t0
    window_step_s, window_rows = 0.0, 0  # time in the training step itself, sequences trained
    loss_value = math.nan
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=run,
        unit="step",
        disable=not progress or not main,
        leave=True,
        position=bar_position,
    )
    batches = iter(loader)
    try:
        with metrics_path.open("a") if main else open(os.devnull, "w") as log:
            for it in range(start + 1, cfg.steps + 1):
                batch = next(batches)
                step = steps[getattr(batch, "loss", None)]
                t_step = time.perf_counter()
                with distributed.watch(f"{run} step {it}"):
                    loss, metrics = step(batch_arrays(batch))
                    mx.eval(loss, metrics, state)
                window_step_s += time.perf_counter() - t_step
                window_rows += batch.tokens.shape[0]
                n = int(batch.mask.sum().item())
                tokens_seen += n
                window_tokens += n
                bar.update(1)
                if it % cfg.log_every == 0 or it == cfg.steps:
                    now = time.perf_counter()
                    loss_value = loss.item()
                    window_all = distributed.sum_floats([window_tokens])[0]  # every rank's
                    record = {
                        "run": run,
                        "step": it,
                        "loss": loss_value,
                        **{k: float(v.item()) for k, v in metrics.items()},
                        "lr": float(optimizer.learning_rate.item()),
                        "tokens_per_s": window_all / max(now - window_t0, 1e-9),
                        "train_tokens_per_s": window_tokens / max(window_step_s, 1e-9),
                        "train_samples_per_s": window_rows / max(window_step_s, 1e-9),
                        "peak_memory_bytes": int(mx.get_peak_memory()),
                    }
                    source_stats = loader.stats() if hasattr(loader, "stats") else {}
                    record.update(source_stats)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    window_tokens, window_t0, window_step_s, window_rows = 0, now, 0.0, 0
                    bar.set_postfix(_postfix(record, bool(source_stats)))
                if (
                    main
                    and validate is not None
                    and ((cfg.eval_every and it % cfg.eval_every == 0) or it == cfg.steps)
                ):
                    valid = {"run": run, "step": it, "valid_loss": validate(model)}
                    log.write(json.dumps(valid) + "\n")
                    log.flush()
                at_checkpoint = cfg.checkpoint_every and it % cfg.checkpoint_every == 0
                if main and (at_checkpoint or it == cfg.steps):
                    _save_checkpoint(ckpt_dir, it, model, optimizer, loader, fingerprint, master)
    finally:
        if restore is not None:
            restore()
    bar.close()
    seconds = time.perf_counter() - t0
    # What a step spends communicating, measured apart (inside the compiled step it is not).
    allreduce = distributed.allreduce_seconds(model.trainable_parameters())
    model.eval()
    return TrainResult(cfg.steps, seconds, tokens_seen, loss_value, start, allreduce)
