"""Students and local teachers as mlx-lm architectures (`llama`, `qwen2`).

Build one from a `ModelConfig`, load an mlx-lm folder, or cut a student from a teacher by keeping
every k-th layer. The fused loss needs the final hidden states and the LM-head weight, which
`hidden_states` and `lm_head_weight` expose for tied and untied heads alike. Saved folders are
plain mlx-lm format: `mlx_lm.load(path)` and `mlx_lm generate --model path` read them offline.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_distill.errors import BadInput
from mlx_distill.recipe import ModelConfig
from mlx_distill.text.tokenizer import TOKENIZER_FILES

ARCHS = ("llama", "qwen2")


def model_config_dict(cfg: ModelConfig, vocab_size: int) -> dict:
    """The `config.json` of an mlx-lm model built from `cfg`."""
    if cfg.arch not in ARCHS:
        raise BadInput(f"unsupported architecture {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise BadInput(
            f"model: hidden_size {cfg.hidden_size} must divide by num_heads {cfg.num_heads}, "
            f"and num_heads by num_kv_heads {cfg.num_kv_heads}"
        )
    return {
        "model_type": cfg.arch,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": cfg.max_position,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def model_from_config(config: dict) -> nn.Module:
    """Instantiate the mlx-lm class named by config['model_type'] (weights are random)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def build_model(cfg: ModelConfig, vocab_size: int) -> tuple[nn.Module, dict]:
    """A freshly initialized model and its config dict."""
    config = model_config_dict(cfg, vocab_size)
    model = model_from_config(config)
    mx.eval(model.parameters())
    return model, config


def load_model(path: str | Path) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer, config) from an mlx-lm folder; safetensors only, no remote code."""
    from mlx_lm import load

    path = Path(path)
    if not (path / "config.json").is_file():
        raise BadInput(f"not an mlx-lm model folder (no config.json): {path}")
    if not list(path.glob("*.safetensors")):
        raise BadInput(f"no .safetensors weights in {path}")
    model, tokenizer, config = load(str(path), return_config=True)
    return model, tokenizer, config


def hidden_states(model: nn.Module, tokens: mx.array) -> mx.array:
    """Final normalized hidden states (B, L, d): the input to the LM head."""
    return model.model(tokens)


def lm_head_weight(model: nn.Module) -> mx.array:
    """The LM head as a (V, d) matrix: the tied embedding or the separate head."""
    head = getattr(model, "lm_head", None)
    if head is not None and "weight" in head:
        if hasattr(head, "scales"):
            return mx.dequantize(head.weight, head.scales, head.biases, head.group_size, head.bits)
        return head.weight
    embed = model.model.embed_tokens
    if hasattr(embed, "scales"):
        return mx.dequantize(embed.weight, embed.scales, embed.biases, embed.group_size, embed.bits)
    return embed.weight


def from_teacher_layers(
    teacher: nn.Module, config: dict, stride: int, layers: list[int] | None = None
) -> tuple[nn.Module, dict]:
    """A student with every `stride`-th teacher layer (the first and the last always kept), or
    with exactly the teacher layers listed in `layers`, in the teacher's order.

    Embeddings, final norm and head are copied too, so the student shares the teacher's
    tokenizer and starts from its representations (DistilBERT-style initialization).
    """
    n = config["num_hidden_layers"]
    if layers is not None:
        if any(not 0 <= i < n for i in layers):
            raise BadInput(f"student.layers {layers}: the teacher has layers 0..{n - 1}")
        keep = sorted(set(layers))
    else:
        keep = sorted(set(range(0, n, stride)) | {n - 1})
    student_config = dict(config, num_hidden_layers=len(keep))
    student_config.pop("quantization", None)
    student = model_from_config(student_config)
    teacher_params = dict(tree_flatten(teacher.parameters()))
    if any(k.endswith(".scales") for k in teacher_params):
        raise BadInput("student.init teacher_layers needs an unquantized teacher")
    weights = {}
    for key, value in teacher_params.items():
        if key.startswith("model.layers."):
            index = int(key.split(".")[2])
            if index not in keep:
                continue
            rest = key.split(".", 3)[3]
            key = f"model.layers.{keep.index(index)}.{rest}"
        weights[key] = mx.array(value)
    student.load_weights(list(weights.items()))
    mx.eval(student.parameters())
    return student, student_config


def save_model(model: nn.Module, config: dict, tokenizer_dir: str | Path, path: str | Path) -> Path:
    """Write an mlx-lm folder (config.json, model.safetensors, tokenizer files) atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        source = Path(tokenizer_dir) / name
        if source.exists():
            shutil.copy2(source, tmp / name)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def export_quantized(model_dir: str | Path, out_dir: str | Path, bits: int) -> Path:
    """Write a `bits`-bit (affine, group 32) copy of an mlx-lm folder that mlx_lm.load reads."""
    from mlx_lm.utils import quantize_model

    model, _, config = load_model(model_dir)
    # mlx-lm prints a summary on stdout; keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        model, config = quantize_model(model, config, group_size=32, bits=bits)
    return save_model(model, config, model_dir, out_dir)


def num_params(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))
