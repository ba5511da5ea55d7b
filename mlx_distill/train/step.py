"""One optimizer step: the gradient of a batch (whole, or in `grad_accum` micro-batches), then
gradient clipping and AdamW, on the model's weights or on fp32 master weights.

`make_step(...)` returns `step(arrays) -> (loss, metrics)` where `arrays` is
`(tokens, labels, mask, ids, logprobs)` of one batch (ids/logprobs None without teacher targets).
Every loss here is a mean over unmasked tokens, so a batch split into micro-batches gives exactly
the whole batch's gradient when each micro-batch's gradient is weighted by its share of the
batch's tokens (`n_i / N`), which is what the accumulation does. Inside an `mx.distributed`
group the same rule joins the ranks: `distributed.token_mean` turns each rank's token mean into
the global batch's, before clipping and the update.

Mixed precision (`train.dtype: bfloat16`): the model computes in bf16; `master` holds the
trainable weights in fp32, the optimizer state is fp32 (initialized from them), and each update is
applied to the fp32 copy and then cast into the model. An update far below bf16's resolution
(2^-8 relative) accumulates in the master copy instead of rounding away.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_distill.recipe import TrainConfig
from mlx_distill.train import distributed

Arrays = tuple  # (tokens, labels, mask, ids | None, logprobs | None)


def batch_arrays(batch) -> Arrays:
    """A loader `Batch` as the step's positional arrays."""
    ids = batch.targets.ids if batch.targets is not None else None
    logprobs = batch.targets.logprobs if batch.targets is not None else None
    return batch.tokens, batch.labels, batch.mask, ids, logprobs


def split(arrays: Arrays, parts: int) -> list[Arrays]:
    """`parts` micro-batches of equal row counts (parts must divide the batch)."""
    rows = arrays[0].shape[0]
    size = rows // parts
    return [
        tuple(None if a is None else a[i * size : (i + 1) * size] for a in arrays)
        for i in range(parts)
    ]


def make_master(model: nn.Module) -> dict:
    """fp32 copies of the trainable weights: {"params": tree} (arrays only, as a checkpoint
    holds them)."""
    flat = tree_flatten(model.trainable_parameters())
    return {"params": tree_unflatten([(k, v.astype(mx.float32)) for k, v in flat])}


def master_to_model(model: nn.Module, master: dict) -> None:
    """Cast the master weights into the model's own dtypes."""
    dtypes = {k: v.dtype for k, v in tree_flatten(model.trainable_parameters())}
    flat = tree_flatten(master["params"])
    model.update(tree_unflatten([(k, v.astype(dtypes[k])) for k, v in flat]))


def make_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    loss_fn: Callable,
    cfg: TrainConfig,
    master: dict | None = None,
) -> Callable[[Arrays], tuple[mx.array, dict]]:
    """The training step for `model` (see the module docstring). mx.eval is left to the caller,
    except between micro-batches, where it frees each one's activations before the next."""
    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]
    if master is not None:
        state.append(master)

    def update(grads):
        if cfg.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        if master is None:
            optimizer.update(model, grads)
        else:
            flat = tree_flatten(grads)  # arrays only, like the master tree
            grads = tree_unflatten([(k, g.astype(mx.float32)) for k, g in flat])
            master["params"] = optimizer.apply_gradients(grads, master["params"])
            master_to_model(model, master)

    if cfg.grad_accum == 1:

        @partial(mx.compile, inputs=state, outputs=state)
        def whole(tokens, labels, mask, ids, logprobs):
            (loss, metrics), grads = grad_fn(model, tokens, labels, mask, ids, logprobs)
            # In a distributed group: the global batch's token means (identity otherwise).
            grads, loss, metrics = distributed.token_mean(grads, loss, metrics, mx.sum(mask))
            update(grads)
            return loss, metrics

        return lambda arrays: whole(*arrays)

    @partial(mx.compile, inputs=state, outputs=state)
    def micro(tokens, labels, mask, ids, logprobs):
        (loss, metrics), grads = grad_fn(model, tokens, labels, mask, ids, logprobs)
        return loss, metrics, grads

    @partial(mx.compile, inputs=state, outputs=state)
    def apply(grads):
        update(grads)
        return mx.array(0)

    def accumulated(arrays: Arrays):
        parts = split(arrays, cfg.grad_accum)
        counts = [mx.sum(p[2]).astype(mx.float32) for p in parts]
        total = mx.maximum(sum(counts), 1.0)
        acc, loss, metrics = None, None, None
        for part, n in zip(parts, counts):
            w = n / total
            p_loss, p_metrics, grads = micro(*part)
            grads = tree_map(lambda g, w=w: g.astype(mx.float32) * w, grads)
            if acc is None:
                acc, loss = grads, p_loss * w
                metrics = {k: v * w for k, v in p_metrics.items()}
            else:
                acc = tree_map(mx.add, acc, grads)
                loss = loss + p_loss * w
                metrics = {k: metrics[k] + v * w for k, v in p_metrics.items()}
            mx.eval(acc, loss, metrics)
        acc, loss, metrics = distributed.token_mean(acc, loss, metrics, sum(counts))
        mx.eval(apply(acc))
        return loss, metrics

    return accumulated
