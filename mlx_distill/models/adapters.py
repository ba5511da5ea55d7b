"""LoRA / DoRA students with mlx-lm's own adapter layers (`student.train: lora | dora`).

`apply_adapters` freezes the student and wraps its layers with
`mlx_lm.tuner.utils.linear_to_lora_layers` (rank, scale, dropout, keys, number of blocks); on a
quantized (4/8-bit) student this is QLoRA. `save_adapters` writes mlx-lm's adapter folder
(`adapter_config.json` + `adapters.safetensors`), which `mlx_lm.load(base, adapter_path=...)`
reads; `fuse_adapters` folds them into the weights as `mlx_lm.fuse` does (a quantized base is
re-quantized), so the exported student loads alone.

The LM head may be an adapter target (`lm_head`, or `model.embed_tokens` for a tied head):
`head_low_rank` gives the head contract (`heads.lm_head`) a LoRA head's low-rank term, which the
fused loss adds chunk by chunk; `head_weight` gives a DoRA head's adapted (V, d) matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_distill.errors import BadInput
from mlx_distill.files import atomic_dir
from mlx_distill.recipe import StudentConfig

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)
HEAD_KEYS = ("lm_head", "model.embed_tokens")


def _wrappable() -> tuple[type, ...]:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (
        nn.Linear,
        nn.QuantizedLinear,
        SwitchLinear,
        QuantizedSwitchLinear,
        nn.Embedding,
        nn.QuantizedEmbedding,
    )


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of `model` holds quantized weights."""
    return any(isinstance(m, QUANTIZED) or "scales" in m for _, m in model.named_modules())


def lora_parameters(s: StudentConfig) -> dict:
    """mlx-lm's `lora_parameters` for this student."""
    out = {"rank": s.lora.rank, "scale": s.lora.scale, "dropout": s.lora.dropout}
    if s.lora.keys is not None:
        out["keys"] = list(s.lora.keys)
    return out


def _num_layers(model: nn.Module, s: StudentConfig) -> int:
    n = len(model.layers)
    return n if s.lora.num_layers is None else min(s.lora.num_layers, n)


def check_adapters(model: nn.Module, s: StudentConfig) -> None:
    """What mlx-lm's adapters cannot do with this model, as one BadInput line.

    Needs only the module tree (the weights may be lazy and never evaluated)."""
    quantized = is_quantized(model)
    if s.train == "full":
        if quantized:
            raise BadInput(
                "recipe key student.train: 'full' on a quantized student; quantized weights "
                "cannot be trained: use lora or dora (QLoRA), or a float student"
            )
        return
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    n = _num_layers(model, s)
    blocks = list(model.layers)[len(model.layers) - n :]
    keys = s.lora.keys
    found: list[tuple[str, nn.Module]] = []
    for block in blocks:
        for name, module in block.named_modules():
            if keys is None and (hasattr(module, "to_lora") or isinstance(module, _wrappable())):
                found.append((name, module))
            elif keys is not None and name in keys:
                found.append((name, module))
    top = {name: m for name, m in model.named_modules() if keys is not None and name in keys}
    found += list(top.items())
    names = {name for name, _ in found}
    for key in keys or []:
        if key not in names:
            raise BadInput(
                f"recipe key student.lora.keys: {key!r} names no module of the last {n} blocks "
                f"(e.g. self_attn.q_proj, mlp.down_proj) and no top-level module (e.g. lm_head)"
            )
    if not found:
        raise BadInput("recipe key student.train: the student has no layer mlx-lm can adapt")
    for name, module in found:
        if not (hasattr(module, "to_lora") or isinstance(module, _wrappable())):
            raise BadInput(
                f"recipe key student.lora.keys: {name!r} is a {type(module).__name__}, which "
                "mlx-lm's LoRA cannot wrap (it wraps Linear, Embedding and their quantized "
                "and mixture-of-experts forms)"
            )
        moe = isinstance(module, (SwitchLinear, QuantizedSwitchLinear))
        if s.train == "dora" and (moe or not isinstance(module, _wrappable())):
            kind = "a mixture-of-experts layer" if moe else f"a {type(module).__name__}"
            raise BadInput(
                f"recipe key student.train: dora on {name!r}, {kind}; mlx-lm has no DoRA "
                "for it: use lora, or leave it out of student.lora.keys"
            )
    head = [k for k in HEAD_KEYS if k in top]
    if head and s.lora.dropout > 0:
        raise BadInput(
            f"recipe key student.lora.dropout: {s.lora.dropout} with the LM head ({head[0]}) "
            "adapted; the fused loss applies the head's adapter without dropout: set it to 0"
        )


def apply_adapters(model: nn.Module, s: StudentConfig) -> None:
    """Freeze `model` and add the adapters of `s` (no-op for `train: full`)."""
    check_adapters(model, s)
    if s.train == "full":
        return
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(
        model, _num_layers(model, s), lora_parameters(s), use_dora=s.train == "dora"
    )


def adapter_config(model: nn.Module, s: StudentConfig, base: str | Path) -> dict:
    """`adapter_config.json` as mlx-lm's `load_adapters` reads it (plus the base model)."""
    return {
        "fine_tune_type": s.train,
        "num_layers": _num_layers(model, s),
        "lora_parameters": lora_parameters(s),
        "model": str(base),
    }


def save_adapters(model: nn.Module, s: StudentConfig, path: str | Path, base: str | Path) -> Path:
    """Write mlx-lm's adapter folder (the trainable weights only), atomically."""
    path = Path(path)
    with atomic_dir(path, keep_old=True) as tmp:  # keeps a base saved inside the folder earlier
        weights = dict(tree_flatten(model.trainable_parameters()))
        mx.save_safetensors(str(tmp / "adapters.safetensors"), weights)
        config = adapter_config(model, s, base)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def fuse_adapters(model: nn.Module) -> None:
    """Fold every adapter into its layer in place (quantized bases stay quantized)."""
    fused = [(n, m.fuse(dequantize=False)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))


def _dequantized(layer: nn.Module) -> mx.array:
    if "scales" in layer:
        return mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=getattr(layer, "mode", "affine"),
        )
    return layer.weight


def base_layer(layer: nn.Module) -> nn.Module:
    """The layer an adapter wraps (the layer itself when it has none)."""
    for name in ("linear", "embedding"):
        if name in layer and isinstance(layer[name], nn.Module) and "lora_a" in layer:
            return layer[name]
    return layer


def head_low_rank(layer: nn.Module) -> tuple[mx.array, mx.array, float] | None:
    """(down (d, r), up (V, r), scale) of a LoRA-wrapped head layer: its logits are
    `base(h) + scale * (h @ down) @ up.T`. None for any other layer (DoRA included)."""
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear

    if isinstance(layer, LoRALinear):  # y = x W.T + scale (x @ lora_a) @ lora_b
        return layer.lora_a, layer.lora_b.T, float(layer.scale)
    if isinstance(layer, LoRAEmbedding):  # as_linear: + scale (x @ lora_b.T) @ lora_a.T
        return layer.lora_b.T, layer.lora_a, float(layer.scale)
    return None


def head_weight(layer: nn.Module) -> mx.array | None:
    """The adapted (V, d) head matrix of a LoRA/DoRA-wrapped head layer, or None if the layer
    has no adapter. Gradients flow to lora_a, lora_b (and DoRA's magnitude m)."""
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear

    if isinstance(layer, (LoRALinear, DoRALinear)):
        base = _dequantized(layer.linear)
        adapted = base + (layer.scale * layer.lora_b.T @ layer.lora_a.T).astype(base.dtype)
    elif isinstance(layer, (LoRAEmbedding, DoRAEmbedding)):
        base = _dequantized(layer.embedding)
        adapted = base + (layer.scale * layer.lora_a @ layer.lora_b).astype(base.dtype)
    else:
        return None
    if isinstance(layer, (DoRALinear, DoRAEmbedding)):
        norm = mx.stop_gradient(mx.linalg.norm(adapted.astype(mx.float32), axis=1))
        adapted = (layer.m / norm).astype(adapted.dtype)[:, None] * adapted
    return adapted


HEAD_MODULES = {"lm_head", "output", "embed_tokens", "wte", "tok_embeddings"}


def head_trains(model: nn.Module) -> bool:
    """Does any trainable parameter belong to the LM head or the (tied) token embedding?"""
    return any(
        HEAD_MODULES & set(k.split(".")) for k, _ in tree_flatten(model.trainable_parameters())
    )


def num_trainable(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
