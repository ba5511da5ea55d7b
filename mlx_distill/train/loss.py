"""The per-batch loss the step differentiates: the fused `distill_loss` through the student's
LM head (KD against sparse teacher targets mixed with CE, or CE alone)."""

from __future__ import annotations

from mlx_distill.kernels import SparseTargets
from mlx_distill.models import head_inputs
from mlx_distill.models.adapters import head_trains
from mlx_distill.recipe import LossConfig


def make_loss(loss_cfg: LossConfig | None):
    """`loss_fn(model, tokens, labels, mask, ids, logprobs) -> (loss, metrics)`; `loss_cfg=None`
    (or a batch without targets, ids None) means hard labels only (cross-entropy)."""

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
