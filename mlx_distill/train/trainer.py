"""The training loop shared by the teacher, the distilled student and the baseline.

One step (`step.make_step`): student hidden states -> `distill_loss` (KD against cached teacher
targets mixed with CE, or CE alone for the baseline) -> AdamW, optionally over `grad_accum`
micro-batches, with fp32 master weights when `train.dtype` is not float32, and with every block
checkpointed when `train.grad_checkpoint`. `mx.eval` runs once per step, outside the compiled
function. `train` is handed its pieces (model, optimizer, batch source, loss, checkpoints,
callback), as mlx-lm's is; `checkpoint.Checkpoints` resumes a killed run at the exact batch it
stopped at and `log.RunLog` writes metrics.jsonl and the progress bar. In an `mx.distributed`
group (see `distributed`) every rank runs this loop on its rows of each global batch; rank 0
alone writes metrics and checkpoints, and every rank resumes from the checkpoint rank 0 picks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_distill.recipe import TrainConfig
from mlx_distill.train import distributed
from mlx_distill.train.checkpoint import Checkpoints
from mlx_distill.train.log import TrainCallback
from mlx_distill.train.recompute import checkpoint_blocks
from mlx_distill.train.step import batch_arrays, make_master, make_step


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    final_loss: float
    resumed_from: int
    allreduce_s: float | None = None  # in a group: one all-reduce of the gradient, median


def schedule(cfg: TrainConfig):
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio, or (schedule:
    constant) cfg.lr to the end."""
    warmup = max(1, min(cfg.warmup, cfg.steps - 1))
    if cfg.schedule == "constant":
        after = lambda _: mx.array(cfg.lr, mx.float32)  # noqa: E731
    else:
        after = optim.cosine_decay(cfg.lr, max(1, cfg.steps - warmup), cfg.lr * cfg.min_lr_ratio)
    return optim.join_schedules(
        [optim.linear_schedule(cfg.lr / warmup, cfg.lr, warmup), after], [warmup]
    )


def adamw(cfg: TrainConfig) -> optim.AdamW:
    """AdamW with the recipe's schedule, betas, eps, weight decay and bias correction."""
    return optim.AdamW(
        learning_rate=schedule(cfg),
        betas=list(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        bias_correction=cfg.bias_correction,
    )


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[optim.Optimizer, dict | None]:
    """Put the model in `cfg.dtype` and build AdamW as the recipe says (`adamw`).

    Below float32 the model computes in `cfg.dtype` and AdamW updates fp32 master weights: the
    returned `master` ({"params": tree}, see `step.make_master`), else None. Returns
    (optimizer, master) for `train`.
    """
    dtype = getattr(mx, cfg.dtype)
    model.set_dtype(dtype)  # a bf16 checkpoint trains in fp32 when the recipe says float32
    master = make_master(model) if dtype != mx.float32 else None
    optimizer = adamw(cfg)
    optimizer.init(master["params"] if master else model.trainable_parameters())
    return optimizer, master


def carry_optimizer(optimizer: optim.Optimizer, cfg: TrainConfig, offset: int) -> optim.Optimizer:
    """AdamW on `cfg`'s schedule that goes on from `optimizer`'s moments and step count (a
    refinement phase with `refine.optimizer: carry`). The schedule restarts at step `offset`
    (the steps already taken): warmup and rate are the new phase's; bias correction, already
    ~1 after them, continues."""
    carried = adamw(cfg)
    fresh = carried._schedulers["learning_rate"]
    carried._schedulers["learning_rate"] = lambda step: fresh(step.astype(mx.int64) - offset)
    carried.state = optimizer.state
    return carried


def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    batches,
    loss: Callable,
    cfg: TrainConfig,
    *,
    name: str = "train",
    master: dict | None = None,
    extra_losses: dict[str, Callable] | None = None,
    checkpoints: Checkpoints | None = None,
    validate: Callable[[nn.Module], float] | None = None,
    callback: TrainCallback | None = None,
) -> TrainResult:
    """Train `model` for cfg.steps batches; resume from `checkpoints` when one matches.

    optimizer, master: from `make_optimizer`. batches: any batch source with `__next__`,
    `state_dict` and `load_state_dict` (the cache `Loader`, or `onpolicy.OnPolicySource`).
    loss: `loss(model, tokens, labels, mask, ids, logprobs) -> (loss, metrics)` (`make_loss`);
    a batch with a `loss` field naming an entry of `extra_losses` is trained with that one.
    name: the run's name in messages. validate: `validate(model) -> mean CE`, run every
    cfg.eval_every steps and after the last (rank 0 only).

    The callback gets, every cfg.log_every steps and after the last, {"step", "loss", "ce",
    "kd", "covered_mass", "lr", "tokens_per_s", "train_tokens_per_s", "train_samples_per_s",
    "peak_memory_bytes"} (the two samples/tokens rates timed over the training step alone; the
    peak is MLX's since training started, what `plan` predicts; plus the source's `stats()`, if
    it has one), and {"step", "valid_loss"} after each validation.
    """
    callback = callback or TrainCallback()
    main = distributed.is_main()  # in a distributed group only rank 0 writes files
    start = checkpoints.resume(model, optimizer, batches, master) if checkpoints else 0
    distributed.check_same(
        f"{name}: starting weights", distributed.weights_digest(model.trainable_parameters())
    )
    state = [model.state, optimizer.state] + ([master] if master else [])
    steps = {None: make_step(model, optimizer, loss, cfg, master)}
    for tag, fn in (extra_losses or {}).items():
        steps[tag] = make_step(model, optimizer, fn, cfg, master)
    restore = checkpoint_blocks(model) if cfg.grad_checkpoint else None
    model.train()
    mx.reset_peak_memory()  # the metrics' peak is the training's, not an earlier stage's
    t0 = time.perf_counter()
    meter = _Meter(t0)
    loss_value = math.nan
    callback.on_start(start, cfg.steps)
    source = iter(batches)
    try:
        for it in range(start + 1, cfg.steps + 1):
            batch = next(source)
            step = steps[getattr(batch, "loss", None)]
            t_step = time.perf_counter()
            with distributed.watch(f"{name} step {it}"):
                value, metrics = step(batch_arrays(batch))
                mx.eval(value, metrics, state)
            meter.add(batch, time.perf_counter() - t_step)
            callback.on_step(it)
            last = it == cfg.steps
            if it % cfg.log_every == 0 or last:
                loss_value = value.item()
                record = {"step": it, "loss": loss_value}
                record.update({k: float(v.item()) for k, v in metrics.items()})
                record["lr"] = float(optimizer.learning_rate.item())
                record.update(meter.rates())
                record["peak_memory_bytes"] = int(mx.get_peak_memory())
                source_stats = batches.stats() if hasattr(batches, "stats") else {}
                record.update(source_stats)
                callback.on_report(record, bool(source_stats))
            at_eval = (cfg.eval_every and it % cfg.eval_every == 0) or last
            if main and validate is not None and at_eval:
                callback.on_valid({"step": it, "valid_loss": validate(model)})
            at_checkpoint = cfg.checkpoint_every and it % cfg.checkpoint_every == 0
            if main and checkpoints is not None and (at_checkpoint or last):
                checkpoints.save(it, model, optimizer, batches, master)
    finally:
        if restore is not None:
            restore()
        callback.on_end()
    seconds = time.perf_counter() - t0
    # What a step spends communicating, measured apart (inside the compiled step it is not).
    allreduce = distributed.allreduce_seconds(model.trainable_parameters())
    model.eval()
    return TrainResult(cfg.steps, seconds, meter.tokens_seen, loss_value, start, allreduce)


class _Meter:
    """Tokens and sequences trained, and the rates of the window since the last report."""

    def __init__(self, t0: float) -> None:
        self.tokens_seen = 0
        self.window_t0 = t0
        self.window_tokens, self.window_step_s, self.window_rows = 0, 0.0, 0

    def add(self, batch, step_s: float) -> None:
        self.window_step_s += step_s  # time in the training step itself
        self.window_rows += batch.tokens.shape[0]
        n = int(batch.mask.sum().item())
        self.tokens_seen += n
        self.window_tokens += n

    def rates(self) -> dict:
        """The window's rates; starts the next window."""
        now = time.perf_counter()
        window_all = distributed.sum_floats([self.window_tokens])[0]  # every rank's
        out = {
            "tokens_per_s": window_all / max(now - self.window_t0, 1e-9),
            "train_tokens_per_s": self.window_tokens / max(self.window_step_s, 1e-9),
            "train_samples_per_s": self.window_rows / max(self.window_step_s, 1e-9),
        }
        self.window_tokens, self.window_t0, self.window_step_s, self.window_rows = 0, now, 0.0, 0
        return out
