"""The LM-head contract: what the fused loss needs from a loaded mlx-lm model.

`head_inputs(model, tokens)` returns the final hidden states and a `Head`: the head weight
wherever the architecture keeps it (tied embedding or separate head, under a multimodal wrapper's
`language_model`, dense or quantized with its mode) and the logits transform the architecture's
`__call__` applies after `hidden @ W.T` (final softcap, logit scale, hidden scale, bias, ids
forced to -inf). The trainer's whole use of it:

    hidden, head = head_inputs(model, tokens)
    head.loss(hidden, targets, ...)  # distill_loss with the head's weight, transform, adapter

A LoRA-adapted head (student.train: lora with the head among the adapter keys) stays its frozen
base weight (dense or quantized) plus the adapter's low-rank term, which the loss adds chunk by
chunk: the adapted (V, d) matrix is never formed, nor a quantized base dequantized.

Only architectures in `ARCHS` are accepted; each was read in mlx-lm's source (what `__call__`
does after the final norm) and is tested against the model's own `model(tokens)` logits
(tests/test_heads.py). Anything else is refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_distill.errors import BadInput
from mlx_distill.kernels.loss import distill_loss
from mlx_distill.kernels.targets import LogitTransform, LowRank, QuantizedWeight
from mlx_distill.models import adapters

EMBED_NAMES = ("embed_tokens", "wte", "tok_embeddings")
HEAD_NAMES = ("lm_head", "output")


def _none(lm: nn.Module, tied: bool) -> dict:
    return {}


def _gemma2(lm, tied):
    return {"softcap": lm.final_logit_softcapping}


def _cohere(lm, tied):
    return {"logit_scale": lm.model.args.logit_scale}


def _granite(lm, tied):
    return {"logit_scale": 1.0 / lm.logits_scaling}


def _minicpm(lm, tied):
    # mlx-lm scales the hidden states for the separate head only (tied: out @ embed.T)
    if tied:
        return {}
    return {"hidden_scale": lm.args.dim_model_base / lm.args.hidden_size}


# model_type -> the transform its __call__ applies (beyond a head bias, which is read off the
# head itself). Wrappers (gemma3, qwen3_5, mistral3) delegate to their `language_model`.
ARCHS: dict[str, Callable[[nn.Module, bool], dict]] = {
    "llama": _none,
    "mistral": _none,
    "qwen2": _none,
    "qwen3": _none,
    "qwen3_5": _none,
    "phi3": _none,
    "gemma": _none,
    "gemma2": _gemma2,
    "gemma3_text": _none,
    "gemma3": _none,
    "cohere": _cohere,
    "granite": _granite,
    "olmo2": _none,
    "smollm3": _none,
    "phi": _none,
    "gpt2": _none,
    "starcoder2": _none,
    "minicpm": _minicpm,
    "internlm2": _none,
    "stablelm": _none,
}


@dataclass
class HeadAdapter:
    """A LoRA head's adapter: logits += scale * (hidden @ down) @ up.T.

    down: (d, r); up: (V, r). For mlx-lm's LoRALinear down = lora_a, up = lora_b.T; for its
    LoRAEmbedding (a tied head) down = lora_b.T, up = lora_a.
    """

    down: mx.array
    up: mx.array
    scale: float


@dataclass
class Head:
    """What `distill_loss` needs besides the hidden states.

    weight: (V, d) array (a trainable parameter when the model's is), or a QuantizedWeight;
        with an adapter, the frozen base.
    transform: the architecture's LogitTransform, or None when logits are `hidden @ W.T`.
    adapter: a LoRA head's low-rank term (`HeadAdapter`), or None.
    """

    weight: mx.array | QuantizedWeight
    transform: LogitTransform | None
    adapter: HeadAdapter | None = None

    def low_rank(self, hidden: mx.array) -> LowRank | None:
        """The adapter's term for `distill_loss(..., low_rank=)`: u (..., r), b (V, r)."""
        if self.adapter is None:
            return None
        a = self.adapter
        return LowRank(a.scale * (hidden @ a.down), a.up)

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def loss(self, hidden: mx.array, targets, **kwargs) -> tuple[mx.array, dict[str, mx.array]]:
        """`distill_loss(hidden (B, L, d), self.weight, targets, **kwargs)` through this head:
        its logits transform and its adapter's low-rank term. Returns (loss, metrics)."""
        return distill_loss(
            hidden,
            self.weight,
            targets,
            transform=self.transform,
            low_rank=self.low_rank(hidden),
            **kwargs,
        )

    def logits(self, hidden: mx.array) -> mx.array:
        """Materialized logits (..., V) in float32 for a few rows (evaluation, teacher scoring)."""
        x = hidden.astype(mx.float32)
        if isinstance(self.weight, QuantizedWeight):
            q = self.weight
            floating = mx.issubdtype(q.scales.dtype, mx.floating)
            scales = q.scales.astype(mx.float32) if floating else q.scales
            biases = None if q.biases is None else q.biases.astype(mx.float32)
            raw = mx.quantized_matmul(
                x,
                q.weight,
                scales,
                biases,
                transpose=True,
                group_size=q.group_size,
                bits=q.bits,
                mode=q.mode,
            )
        else:
            raw = x @ self.weight.astype(mx.float32).T
        lr = self.low_rank(x)
        if lr is not None:
            raw = raw + lr.u.astype(mx.float32) @ lr.b.astype(mx.float32).T
        return raw if self.transform is None else self.transform.apply(raw)


def architecture(model: nn.Module) -> str:
    """The model's mlx-lm `model_type` (e.g. 'qwen2', 'gemma3')."""
    return str(getattr(model, "model_type", type(model).__module__.rsplit(".", 1)[-1]))


def check_architecture(model_type: str) -> None:
    """BadInput unless `model_type` is on the verified allow-list."""
    if model_type not in ARCHS:
        raise BadInput(
            f"architecture {model_type!r} is not verified for the fused LM-head loss; "
            f"verified: {', '.join(sorted(ARCHS))}"
        )


def text_model(model: nn.Module) -> nn.Module:
    """The language model inside a multimodal wrapper (`language_model`), else the model."""
    return model["language_model"] if "language_model" in model else model


def hidden_states(model: nn.Module, tokens: mx.array) -> mx.array:
    """Final normalized hidden states (B, L, d): the input to the LM head."""
    # cache passed positionally: some backbones (phi, stablelm) have no default for it
    return text_model(model).model(tokens, None)


def _embedding(backbone: nn.Module) -> nn.Module:
    for name in EMBED_NAMES:
        if name in backbone:
            return backbone[name]
    raise BadInput(f"{type(backbone).__name__}: no token embedding ({', '.join(EMBED_NAMES)})")


def _weight_of(module: nn.Module, where: str) -> mx.array | QuantizedWeight:
    if "scales" not in module:
        return module["weight"]
    if "global_scale" in module:
        raise BadInput(f"{where}: quantization mode {module.mode!r} (global scale) not supported")
    return QuantizedWeight(
        module["weight"],
        module["scales"],
        module.get("biases"),
        module.group_size,
        module.bits,
        getattr(module, "mode", "affine"),
    )


def lm_head(model: nn.Module) -> Head:
    """The head weight and logits transform of an allow-listed mlx-lm model."""
    model_type = architecture(model)
    check_architecture(model_type)
    lm = text_model(model)
    head_module = next((lm[name] for name in HEAD_NAMES if name in lm), None)
    tied = head_module is None
    if tied:
        head_module = _embedding(lm.model)
    inner = architecture(lm)
    transform_of = ARCHS.get(inner, ARCHS[model_type])
    fields = transform_of(lm, tied)
    base = adapters.base_layer(head_module)
    if "bias" in base:
        fields["bias"] = base["bias"]
    transform = LogitTransform(**fields)
    transform = None if transform.is_identity else transform
    # A LoRA head: its frozen base and the low-rank term, applied chunk by chunk in the loss.
    adapter = adapters.head_low_rank(head_module)
    if adapter is not None:
        return Head(_weight_of(base, model_type), transform, HeadAdapter(*adapter))
    # A DoRA head: its adapted (V, d) matrix, through which the adapter's gradients flow (its
    # row norms need the whole matrix; a quantized base is dequantized for it).
    adapted = adapters.head_weight(head_module)
    weight = adapted if adapted is not None else _weight_of(head_module, model_type)
    return Head(weight, transform)


def head_inputs(model: nn.Module, tokens: mx.array) -> tuple[mx.array, Head]:
    """(hidden (B, L, d), Head) for `distill_loss(hidden, head.weight, ..., transform=...)`."""
    head = lm_head(model)
    return hidden_states(model, tokens), head


def lm_head_weight(model: nn.Module) -> mx.array:
    """The head as a dense (V, d) matrix (dequantized whole, adapter folded in). Prefer
    `lm_head(model)`."""
    head = lm_head(model)
    weight = head.weight
    weight = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight
    if head.adapter is not None:
        a = head.adapter
        weight = weight + (a.scale * a.up @ a.down.T).astype(weight.dtype)
    return weight
