"""Gradient checkpointing of every transformer block (`train.grad_checkpoint`).

Each block of `model.layers` keeps only its input for the backward pass and recomputes its
intermediates there (`mx.checkpoint`), so the activations kept per step are one block's plus one
hidden state per block. mlx-lm's `tuner.trainer.grad_checkpoint` patches `type(layers[0]).__call__`
for the whole process and only covers blocks of that class; here each block instance gets a
checkpointed subclass of its own class (hybrid stacks are covered whatever their block types), and
`restore` puts the original classes back, so a teacher or an evaluation model in the same process
is never affected.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

_SUBCLASSES: dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    if cls not in _SUBCLASSES:
        call = cls.__call__

        def __call__(self, *args, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return call(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        _SUBCLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
    return _SUBCLASSES[cls]


def checkpoint_blocks(model: nn.Module) -> Callable[[], None]:
    """Checkpoint every block in `model.layers`; returns a function that undoes it."""
    layers = list(model.layers)
    originals = [type(layer) for layer in layers]
    for layer, cls in zip(layers, originals):
        layer.__class__ = _checkpointed(cls)

    def restore() -> None:
        for layer, cls in zip(layers, originals):
            layer.__class__ = cls

    return restore
