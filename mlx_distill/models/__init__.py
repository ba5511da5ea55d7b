"""Students and local teachers as mlx-lm architectures.

Build one from a `ModelConfig` (`llama`, `qwen2`), load an mlx-lm folder of any architecture
mlx-lm builds, or cut a student from a teacher by keeping every k-th layer. The fused loss needs
the final hidden states, the LM-head weight and the architecture's logits transform:
`head_inputs` (see `heads.py`), proven on a probe whenever a model is loaded or built (`prove`;
a model it does not hold for is refused with one line). Saved folders are plain mlx-lm
format: `mlx_lm.load(path)` and `mlx_lm generate --model path` read them offline.
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
from mlx_distill.files import atomic_dir
from mlx_distill.models.heads import (
    Contract,
    Head,
    architecture,
    backbone,
    contract,
    head_inputs,
    hidden_states,
    lm_head,
    lm_head_weight,
    text_model,
)
from mlx_distill.recipe import ModelConfig
from mlx_distill.text.tokenizer import TOKENIZER_FILES, load_tokenizer

ARCHS = ("llama", "qwen2")  # what `build_model` builds from a ModelConfig

__all__ = [
    "ARCHS",
    "Contract",
    "Head",
    "architecture",
    "build_model",
    "FLOAT_BYTES",
    "check_folder",
    "check_teacher_layers",
    "contract",
    "export_quantized",
    "floating_dtype",
    "from_teacher_layers",
    "head_inputs",
    "hidden_states",
    "lm_head",
    "lm_head_weight",
    "load_model",
    "model_from_config",
    "num_params",
    "save_model",
    "text_model",
]


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
    contract(model)
    return model, config


def load_model(path: str | Path) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer, config) from an mlx-lm folder; safetensors only, no remote code.

    What `mlx_lm.load` returns, with the tokenizer from the project's loader (cached in-process
    by content, and stopping at the chat template's end-of-turn token too). The head contract
    is proven on the loaded model (once per folder content in this process): BadInput if it
    does not hold.
    """
    path = Path(path)
    model, config = _load_proven(path)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config


# folder content (path, config.json, weight files' sizes and times) -> its proven contract
_PROVEN: dict[tuple, Contract] = {}


def _folder_key(path: Path) -> tuple:
    files = sorted(path.glob("*.safetensors"))
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return str(path.resolve()), (path / "config.json").read_bytes(), stats


def _load_proven(path: Path) -> tuple[nn.Module, dict]:
    from mlx_lm.utils import load_model as load_weights

    if not (path / "config.json").is_file():
        raise BadInput(f"not an mlx-lm model folder (no config.json): {path}")
    if not list(path.glob("*.safetensors")):
        raise BadInput(f"no .safetensors weights in {path}")
    check_folder(path, weights=False)
    key = _folder_key(path)
    model, config = load_weights(path)
    if key in _PROVEN:
        model._head_contract = _PROVEN[key]
    _PROVEN[key] = contract(model)
    return model, config


def check_folder(path: str | Path, weights: bool = True) -> None:
    """BadInput (one line) unless mlx-lm can build the folder's architecture and, with
    `weights` and the weights present, the head contract holds on them (proven on a probe
    once per folder content). A folder holding config.json alone is checked from it."""
    from mlx_lm.utils import _get_classes

    path = Path(path)
    if not (path / "config.json").is_file():
        raise BadInput(f"not an mlx-lm model folder (no config.json): {path}")
    model_type = _model_type(path)
    try:
        _get_classes({"model_type": model_type})
    except ValueError:
        import mlx_lm

        raise BadInput(
            f"{path}: architecture {model_type!r} is not one mlx-lm {mlx_lm.__version__} can "
            f"build (no mlx_lm.models.{model_type})"
        ) from None
    if weights and list(path.glob("*.safetensors")) and _folder_key(path) not in _PROVEN:
        _load_proven(path)


def _model_type(path: Path) -> str:
    """config.json's model_type, with mlx-lm's own aliases (e.g. mistral -> llama) kept."""
    try:
        return str(json.loads((path / "config.json").read_text())["model_type"])
    except (ValueError, KeyError):
        raise BadInput(f"{path / 'config.json'}: no model_type") from None


def _layer_list(model: nn.Module) -> tuple[str, list]:
    """(parameter path, modules) of the model's list of transformer blocks."""
    lm = text_model(model)
    paths = {id(m): p for p, m in model.named_modules()}
    for owner in (backbone(lm), lm):
        for name in ("layers", "h"):
            if owner is not None and isinstance(owner.get(name), list):
                prefix = paths[id(owner)]
                return f"{prefix}.{name}" if prefix else name, owner[name]
    raise BadInput(f"{architecture(model)}: no list of layers in its backbone (layers, h)")


def _layer_kind(layer: nn.Module, path: str = "") -> dict:
    """What makes one block differ from another of the same model besides its weights: module
    classes and scalar settings (sliding window or not, RoPE or NoPE...), without indices and
    layer counts."""
    out = {path + "<class>": type(layer).__name__}
    for key, value in vars(layer).items():
        if key[0] == "_" or "idx" in key or key in ("num_hidden_layers", "num_layers", "n_layer"):
            continue
        if isinstance(value, bool | int | float | str):
            out[path + key] = value
    for name, child in layer.children().items():
        if isinstance(child, nn.Module):
            out.update(_layer_kind(child, f"{path}{name}."))
    return out


def _cut_config(teacher: nn.Module, config: dict, n: int, keep: list[int]) -> dict:
    """The teacher's config with `keep` layers: the layer count and every per-layer list."""
    student = json.loads(json.dumps(config))
    student.pop("quantization", None)
    student.pop("quantization_config", None)
    target = student["text_config"] if "text_config" in student else student
    names = ("num_hidden_layers", "n_layer", "num_layers")
    key = next((k for k in names if target.get(k) == n), None)
    if key is None:
        raise BadInput(f"{architecture(teacher)}: config has no layer count equal to {n}")
    target[key] = len(keep)
    lm = text_model(teacher)
    args = getattr(lm, "args", None) or getattr(lm, "config", None)  # Gemma 3n: config
    for name, value in (vars(args) if args is not None else {}).items():
        pattern = isinstance(value, str) and name.endswith("pattern")  # Nemotron-H's "M*M-"
        if (isinstance(value, list) or pattern) and len(value) == n:
            cut = [value[i] for i in keep]
            target[name] = "".join(cut) if pattern else cut
        elif isinstance(value, list) and name.endswith(("_idxs", "_layers")):
            # lists of layer indices (LFM2's full_attn_idxs, Qwen3-MoE's mlp_only_layers)
            if all(isinstance(i, int) and 0 <= i < n for i in value):
                target[name] = [keep.index(i) for i in value if i in keep]
    return student


def from_teacher_layers(
    teacher: nn.Module, config: dict, stride: int, layers: list[int] | None = None
) -> tuple[nn.Module, dict]:
    """A student with every `stride`-th teacher layer (the first and the last always kept), or
    with exactly the teacher layers listed in `layers`, in the teacher's order.

    Embeddings, final norm and head are copied too, so the student shares the teacher's
    tokenizer and starts from its representations (DistilBERT-style initialization). Works for
    every architecture whose blocks form one list (dense, mixture-of-experts, hybrid); refused
    when a kept layer would change kind at its new position (e.g. Gemma 3's sliding/global
    pattern, Qwen3.5's linear/full attention).
    """
    contract(teacher)
    student, student_config = _cut_student(teacher, config, stride, layers)
    mx.eval(student.parameters())
    try:
        contract(student)
    except BadInput as e:  # e.g. Nemotron-H cut to no attention layer: its forward fails
        raise BadInput(f"student.init teacher_layers: the cut student: {e}") from None
    return student, student_config


def check_teacher_layers(path: str | Path, stride: int, layers: list[int] | None) -> None:
    """BadInput (one line) unless `from_teacher_layers` can cut the teacher in the mlx-lm folder
    `path`: checked on its lazily loaded weights, none of them read (the run's preflight)."""
    from mlx_lm.utils import load_model as load_weights

    teacher, config = load_weights(Path(path), lazy=True)
    _cut_student(teacher, config, stride, layers)


def _cut_student(teacher: nn.Module, config: dict, stride: int, layers: list[int] | None):
    """(student, config) of `from_teacher_layers`, its weights the teacher's lazy arrays."""
    arch = architecture(teacher)
    path, teacher_layers = _layer_list(teacher)
    n = len(teacher_layers)
    if layers is not None:
        if any(not 0 <= i < n for i in layers):
            raise BadInput(f"student.layers {layers}: the teacher has layers 0..{n - 1}")
        keep = sorted(set(layers))
    else:
        keep = sorted(set(range(0, n, stride)) | {n - 1})
    teacher_params = dict(tree_flatten(teacher.parameters()))
    if any(k.endswith(".scales") for k in teacher_params):
        raise BadInput("student.init teacher_layers needs an unquantized teacher")
    student_config = _cut_config(teacher, config, n, keep)
    try:
        student = model_from_config(student_config)
    except Exception as e:  # a layer pattern the architecture's code cannot take (gpt_oss)
        detail = f"{type(e).__name__}: {str(e).strip()[:120]}"
        raise BadInput(
            f"student.layers {keep}: mlx-lm cannot build a {arch} student from these teacher "
            f"layers ({detail}); choose others"
        ) from None
    _, student_layers = _layer_list(student)
    for j, i in enumerate(keep):
        want, got = _layer_kind(teacher_layers[i]), _layer_kind(student_layers[j])
        if want != got:
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise BadInput(
                f"student.layers {keep}: {arch} teacher layer {i} would become student layer "
                f"{j} of another kind ({', '.join(diff[:3])} differ); choose layers whose "
                f"positions keep their kind"
            )
    shapes = {k: v.shape for k, v in tree_flatten(student.parameters())}
    weights = {}
    for key, value in teacher_params.items():
        if key.startswith(path + "."):
            index, rest = key[len(path) + 1 :].split(".", 1)
            if int(index) not in keep:
                continue
            key = f"{path}.{keep.index(int(index))}.{rest}"
        weights[key] = _layer_blocks(mx.array(value), shapes.get(key), n, keep)
    if hasattr(student, "sanitize"):
        weights = student.sanitize(weights)  # as mlx_lm.load does (e.g. Gemma 3's tied head)
    try:
        student.load_weights(list(weights.items()))
    except ValueError as e:
        raise BadInput(f"student.init teacher_layers: cannot cut the {arch} teacher: {e}") from None
    return student, student_config


def _layer_blocks(value: mx.array, shape: tuple | None, n: int, keep: list[int]) -> mx.array:
    """`value` with the kept layers' blocks only, along the one axis that holds a block per
    teacher layer (Gemma 3n's and 4's per-layer input embeddings and projection); as it is
    when no axis is n blocks becoming len(keep) blocks."""
    if shape is None or value.ndim != len(shape):
        return value
    axes = [a for a in range(value.ndim) if value.shape[a] != shape[a]]
    if len(axes) != 1 or value.shape[axes[0]] % n:
        return value
    a, p = axes[0], value.shape[axes[0]] // n
    if shape[a] != p * len(keep):
        return value
    rows = mx.array([i * p + j for i in keep for j in range(p)])
    return mx.take(value, rows, axis=a)


FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the dtypes a model is saved in


def floating_dtype(weights: dict | nn.Module) -> str:
    """The dtype most of a model's floating-point weights (by count) are in: "bfloat16" for a bf16
    checkpoint, also when it is quantized (its scales and norms); float32 when it has none."""
    if isinstance(weights, nn.Module):
        weights = dict(tree_flatten(weights.parameters()))
    counts: dict[str, int] = {}
    for v in weights.values():
        if mx.issubdtype(v.dtype, mx.floating):
            name = str(v.dtype).removeprefix("mlx.core.")
            counts[name] = counts.get(name, 0) + v.size
    return max(counts, key=counts.get) if counts else "float32"


def _with_dtype(config: dict, dtype: str) -> dict:
    """config.json saying the dtype the weights are saved in (torch_dtype, and transformers'
    newer `dtype` and a nested text_config's where the config has them)."""
    config = dict(config, torch_dtype=dtype)
    if "dtype" in config:
        config["dtype"] = dtype
    if isinstance(config.get("text_config"), dict) and "torch_dtype" in config["text_config"]:
        config["text_config"] = dict(config["text_config"], torch_dtype=dtype)
    return config


def save_model(
    model: nn.Module,
    config: dict,
    tokenizer_dir: str | Path,
    path: str | Path,
    dtype: str | None = None,
) -> Path:
    """Write an mlx-lm folder (config.json, model.safetensors, tokenizer files) atomically.

    dtype: "float32", "bfloat16" or "float16": the floating-point weights are cast to it (packed
    quantized weights stay as they are); None: saved as they are. config.json's torch_dtype
    says what was saved. With a tokenizer, `eos_token_id` in config.json and
    generation_config.json lists every id generation must stop at: the config's own, the
    tokenizer's EOS and the chat template's end-of-turn token (Gemma's `<turn|>` is not its
    `<eos>`; a base Qwen2's EOS is `<|endoftext|>`, not `<|im_end|>`), so `mlx_lm.generate`
    stops where a trained turn ends.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        weights = dict(tree_flatten(model.parameters()))
        if dtype is not None:
            cast = getattr(mx, dtype)
            weights = {
                k: v.astype(cast) if mx.issubdtype(v.dtype, mx.floating) else v
                for k, v in weights.items()
            }
        config = _with_dtype(config, floating_dtype(weights))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.exists():
                shutil.copy2(source, tmp / name)
        _write_stop_ids(tmp, config, Path(tokenizer_dir) / "generation_config.json")
    return path


def _write_stop_ids(folder: Path, config: dict, generation_config: Path) -> None:
    """Set eos_token_id (config.json, generation_config.json) to every id that ends a turn."""
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return
    own = config.get("eos_token_id")
    ids = [own] if isinstance(own, int) else list(own or [])
    tokenizer = load_tokenizer(folder, eos_token_ids=ids)
    ids += sorted(set(tokenizer.eos_token_ids) - set(ids))
    if not ids:
        return
    value = ids[0] if len(ids) == 1 else ids
    (folder / "config.json").write_text(json.dumps(dict(config, eos_token_id=value), indent=2))
    generation = {}
    if generation_config.is_file():  # a pretrained student's own settings are kept
        generation = json.loads(generation_config.read_text(encoding="utf-8"))
    generation["eos_token_id"] = value
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def export_quantized(model_dir: str | Path, out_dir: str | Path, bits: int) -> Path:
    """Write a `bits`-bit (affine, group 32) copy of an mlx-lm folder that mlx_lm.load reads."""
    from mlx_lm.utils import quantize_model

    model, _, config = load_model(model_dir)
    # mlx-lm prints a summary on stdout; keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        model, config = quantize_model(model, config, group_size=32, bits=bits)
    return save_model(model, config, model_dir, out_dir)


def num_params(model: nn.Module) -> int:
    """The model's parameter count as unquantized: a quantized layer's packed uint32 weight
    counts 32 / bits weights per element; its scales and biases (quantization data) are left
    out."""
    total = 0
    for _, module in model.named_modules():
        bits = getattr(module, "bits", None)
        for name, v in module.parameters().items():
            if not isinstance(v, mx.array) or (bits and name in ("scales", "biases")):
                continue  # a container (counted at its own module), or quantization data
            packed = bits and name == "weight" and v.dtype == mx.uint32
            total += v.size * 32 // bits if packed else v.size
    return total
