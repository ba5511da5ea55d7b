"""`mlx-distill plan`: each stage's predicted peak memory against what this device can use.

Models are built as lazy skeletons (shapes and dtypes only; a folder's weights are mapped, never
read, and a folder holding only config.json is built from the config), so a plan costs no
memory and little time; only a folder's head-contract probe reads its weights, once per process
(`models.check_folder`). The peak of a training step is the sum of: all weights (in train.dtype;
quantized weights packed), the trainable weights' gradients, AdamW's two fp32 moments (+ fp32
masters below fp32), the activations the backward pass keeps (every block's, or with
`grad_checkpoint` one hidden state per block plus one block's), the fused loss's chunk buffers
(chunk x V) with its (V, d) head gradients, and the teacher targets. The terms are written out
in `train_terms`, `score_terms` and `eval_terms`; `tests/test_plan.py` checks the totals against
`mx.get_peak_memory()` on tiny models and, stage by stage, at real vocabulary sizes. The
wall-time estimate is `plan_time.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_distill import backend
from mlx_distill.errors import BadInput
from mlx_distill.kernels.loss import choose_chunk
from mlx_distill.models import check_folder, model_config_dict, model_from_config
from mlx_distill.models.adapters import apply_adapters
from mlx_distill.recipe import Recipe
from mlx_distill.text.tokenizer import load_tokenizer

GB = 1 << 30
# (rows, V) fp32 buffers a loss chunk keeps live at its peak (measured on the CPU: ~2.5), and
# those of the next chunk, which starts before they are all freed: 1.5 more for sparse teacher
# targets through a tied or frozen head (4 in all, what kernels.loss.choose_chunk budgets), with
# one (V, d) head gradient; 3.5 more, with 3 head gradients (and the untied embedding's own), for
# hard labels alone or a trained untied head (measured at V = 128k and 152k, 256-row chunks).
CHUNK_BUFFERS = 2.5
OVERLAP, WIDE_OVERLAP, WIDE_HEAD_GRADS = 1.5, 3.5, 3
# Teacher scoring (`LocalTeacher.score`), in units of one forward pass's (rows, T, V) fp32
# logits: measured 6 when every position carries loss (the logits, their copy without padded
# rows, and ~4 (positions, V) arrays gathered at the loss positions: log-probs and top-k), 4.3
# when 3/4 of them do (a chat row's answer); 5 sits within 20% of both.
SCORE_BUFFERS = 5
# Per block and token, in units of the activation itemsize: what autodiff keeps for the
# backward pass of a llama/qwen2 block (norm inputs/outputs, q/k/v and their rotations, the
# attention output, the MLP's gate/up/activation/product, the residuals).
ACT_D, ACT_KV, ACT_I, ACT_ATT = 10, 3, 5, 1
# Extra (H, L) rows per token one block's attention backward holds (score gradients, softmax
# backward) on top of the two it kept (scores, probabilities).
ATT_BACKWARD = 4


@dataclass
class Shape:
    """What the memory model needs to know about one model."""

    layers: int
    d: int
    inter: int
    heads: int
    kv_dim: int
    vocab: int
    weight_bytes: int  # all parameters, as stored for training
    values: int  # parameter count, quantized weights unpacked
    quantized: bool
    trainable: int  # trainable parameter count
    trainable_itemsize: int
    head_trainable: bool  # is the LM head (or tied embedding) trained?
    tied: bool = True  # the head is the embedding table
    embed_trainable: bool = False  # an untied embedding table is trained


def _nbytes(a: mx.array, dtype=None) -> int:
    return a.size * (dtype or a.dtype).size


def _floating(a: mx.array) -> bool:
    return mx.issubdtype(a.dtype, mx.floating)


def _values(model: nn.Module) -> int:
    """Parameter count with packed quantized weights counted as the values they hold."""
    modules = dict(model.named_modules())
    count = 0
    for key, a in tree_flatten(model.parameters()):
        owner, _, leaf = key.rpartition(".")
        bits = getattr(modules.get(owner), "bits", None)
        if bits and leaf in ("scales", "biases"):
            continue
        count += a.size * 32 // bits if bits and a.dtype == mx.uint32 else a.size
    return count


def shape_of(model: nn.Module, config: dict, dtype=None) -> Shape:
    """A `Shape` from a (lazy) model; `dtype`: the dtype floating weights are cast to."""
    params = tree_flatten(model.parameters())
    trainable = tree_flatten(model.trainable_parameters())
    cast = lambda a: dtype if (dtype is not None and _floating(a)) else a.dtype  # noqa: E731
    head_keys = ("lm_head.", "model.embed_tokens.")
    config = {**config, **config.get("text_config", {})}  # a multimodal config's text model
    d = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    return Shape(
        layers=config["num_hidden_layers"],
        d=d,
        inter=config["intermediate_size"],
        heads=heads,
        kv_dim=(config.get("num_key_value_heads") or heads) * head_dim,
        vocab=config["vocab_size"],
        weight_bytes=sum(_nbytes(a, cast(a)) for _, a in params),
        values=_values(model),
        quantized=any(k.endswith(".scales") for k, _ in params),
        trainable=sum(a.size for _, a in trainable),
        trainable_itemsize=max((cast(a).size for _, a in trainable), default=4),
        head_trainable=any(k.startswith(head_keys) for k, _ in trainable),
        tied=not any(".lm_head." in f".{k}" for k, _ in params),
        embed_trainable=any(".embed_tokens." in f".{k}" for k, _ in trainable),
    )


def _block_act(s: Shape, tokens: int, seq: int, itemsize: int) -> int:
    """Bytes one block keeps for backward over `tokens` tokens of sequences of length `seq`."""
    per_token = ACT_D * s.d + ACT_KV * s.kv_dim + ACT_I * s.inter + ACT_ATT * s.heads * seq
    return tokens * per_token * itemsize


def loss_chunk(tokens: int, vocab: int, chunk: int | None, labels_at_t: bool) -> int:
    """Rows per loss chunk as `distill_loss` picks them."""
    if chunk is not None:
        return min(chunk, tokens)

    return choose_chunk(tokens, vocab, 4, False, labels_at_t)


def chunk_bytes(tokens: int, n: int, vocab: int, overlap: float = OVERLAP) -> int:
    """Bytes the fused loss's (rows, V) buffers hold over `tokens` rows in chunks of `n`."""
    return int((CHUNK_BUFFERS * n + overlap * min(n, tokens - n)) * vocab * 4)


def train_terms(
    s: Shape,
    *,
    batch: int,
    seq: int,
    k: int,
    kd: bool,
    dtype: str = "float32",
    grad_checkpoint: bool = False,
    grad_accum: int = 1,
    chunk: int | None = None,
) -> dict[str, int]:
    """Predicted bytes of one training step, by term (their sum is the peak)."""
    itemsize = getattr(mx, dtype).size
    micro = batch // grad_accum
    tokens = micro * seq
    master = 4 * s.trainable if dtype != "float32" else 0
    grads = s.trainable * s.trainable_itemsize
    terms = {
        "weights": s.weight_bytes,
        "optimizer": 8 * s.trainable + master,
        "accumulated_gradients": 4 * s.trainable if grad_accum > 1 else 0,
        "targets": tokens * (k * 8 if kd else 0) + tokens * 12,
    }
    block = _block_act(s, tokens, seq, itemsize)
    # Kept for the backward pass: every block's activations, or each block's input only.
    terms["activations"] = (
        tokens * s.d * itemsize * s.layers if grad_checkpoint else block * s.layers
    )
    n = loss_chunk(tokens, s.vocab, chunk, False)
    # The loss runs at the end of the forward pass: chunk buffers, the (V, d) head gradient (a
    # trained head only) and dh (N, d) in fp32, and fp32 copies of head and hidden states when
    # they are not fp32.
    compact = kd and (s.tied or not s.head_trainable)
    overlap, head_grads = (OVERLAP, 1) if compact else (WIDE_OVERLAP, WIDE_HEAD_GRADS)
    vd = 4 * s.vocab * s.d
    head = vd * (
        (head_grads if s.head_trainable else 0)
        + (1 if s.embed_trainable and not s.tied else 0)
        + (1 if itemsize != 4 else 0)
    )
    loss = chunk_bytes(tokens, n, s.vocab, overlap) + head + tokens * s.d * 4 * 2
    # Then the backward pass: the gradients (and, checkpointed, one block recomputed at a time).
    attention = tokens * ATT_BACKWARD * s.heads * seq * itemsize
    backward = grads + (block if grad_checkpoint else 0) + attention
    if loss >= backward:
        terms["loss"] = loss
    else:
        terms["gradients"] = backward
    return terms


def scoring_bytes(s: Shape) -> tuple[int, int]:
    """(bytes of the weights a local teacher scores with, bytes held beside them while they are
    converted): on the CPU backend `LocalTeacher` casts them to fp32, a quantized teacher
    dequantized when its fp32 copy fits in half the memory (packed and fp32 copies meet once)."""
    fp32 = 4 * s.values
    if backend.device() != "cpu" or (s.quantized and fp32 > backend.memory_bytes() // 2):
        return s.weight_bytes, 0
    return fp32, s.weight_bytes if s.quantized else 0


def score_terms(s: Shape, *, batch: int, seq: int, max_logits_mb: int = 256) -> dict[str, int]:
    """Predicted bytes of a local teacher's scoring pass (`teachers.local.LocalTeacher.score`)."""
    rows = max(1, min(batch, (max_logits_mb << 20) // max(1, s.vocab * seq * 4)))
    tokens = rows * seq
    forward = tokens * (4 * s.d + 2 * s.inter) * 4 + rows * s.heads * seq * seq * 4 * 2
    weights, converting = scoring_bytes(s)
    terms = {"weights": weights, "activations": forward}
    logits = int(SCORE_BUFFERS * tokens * s.vocab * 4)
    if converting > forward + logits:  # the load is the peak: packed and fp32 weights at once
        terms["conversion"] = converting
    else:
        terms["logits"] = logits
    return terms


def onpolicy_terms(
    teacher: Shape, student: Shape, step: dict[str, int], *, batch: int, seq: int
) -> dict[str, int]:
    """What on-policy distillation adds to a training step's peak (`step`: its `train_terms`).

    The teacher's weights stay loaded beside the student. Sampling (the student's KV cache and
    last-position logits) and the teacher's scoring pass run between training steps, so only what
    the larger of them needs beyond the step's own transients adds to the peak.
    """
    score = score_terms(teacher, batch=batch, seq=seq)
    sampling = batch * seq * student.layers * 2 * student.kv_dim * 4 + batch * student.vocab * 4
    between = max(score["activations"] + score["logits"], sampling)
    transient = sum(step.get(n, 0) for n in ("activations", "loss", "gradients"))
    return {"teacher_weights": score["weights"], "teacher_scoring": max(0, between - transient)}


def eval_terms(
    shapes: list[Shape], teacher: Shape | None, *, rows: int, seq: int, batch: int, new: int
) -> dict[str, int]:
    """Every evaluated model (`shapes`, the teacher among them) is loaded at once; on top, the
    largest of: the top-1 agreement's logits of a student and the teacher (`rows` rows of
    `seq` tokens), the perplexity pass of the largest model (its loss chunks), greedy decoding
    of `batch` rows of `seq` + `new` tokens (KV caches and last-position logits). The agreement
    holds the whole (rows x seq, V) fp32 logits of both models at once (`evaluate._argmax_rows`
    evaluates its row chunks in one graph; measured at V = 152k: 1.04 x these)."""
    big = max(shapes, key=lambda s: s.weight_bytes)
    tokens = rows * seq
    n = loss_chunk(tokens, big.vocab, None, False)
    hidden = tokens * (big.inter + 4 * big.d) * 4
    transient = {
        "loss": chunk_bytes(tokens, n, big.vocab) + hidden,
        "generation": batch * (seq + new) * big.layers * 2 * big.kv_dim * 4
        + batch * big.vocab * 4 * 2,
    }
    if teacher is not None:
        student = max((s for s in shapes if s is not teacher), key=lambda s: s.vocab, default=big)
        transient["agreement_logits"] = tokens * (student.vocab + teacher.vocab) * 4 + hidden
    name = max(transient, key=transient.get)
    return {"weights": sum(s.weight_bytes for s in shapes), name: transient[name]}


# -- skeletons from a recipe ------------------------------------------------------------------


def config_skeleton(config: dict) -> nn.Module:
    """The model `config` (a config.json) describes, with lazy random weights (nothing is
    allocated) in the checkpoint's dtype, quantized as its "quantization" section says: every
    layer mlx-lm's converter quantizes (a `to_quantized` layer whose input size divides by the
    group size, and the model's own `quant_predicate`), the section's per-layer entries first."""
    model = model_from_config(config)
    dtype = config.get("torch_dtype") or config.get("dtype")  # the checkpoint's float dtype
    if isinstance(dtype, str) and hasattr(mx, dtype):
        model.set_dtype(getattr(mx, dtype))
    quant = config.get("quantization")
    if not quant:
        return model
    group = quant.get("group_size", 64)
    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module):
        if path in quant:  # a per-layer entry: its own bits / group size, or False
            return quant[path]
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group:
            return False
        return own(path, module) if own is not None else True

    nn.quantize(
        model,
        group_size=group,
        bits=quant.get("bits", 4),
        mode=quant.get("mode", "affine"),
        class_predicate=predicate,
    )
    return model


@dataclass
class Skeleton:
    """A model as a stage builds it, with lazy weights, and where its weights come from: a
    folder holding them, None when the recipe builds them, or why they are not at hand."""

    model: nn.Module
    config: dict
    weights: Path | str | None


def folder_skeleton(path: Path) -> Skeleton:
    """A model folder's skeleton: from its weights' headers when it has them, else from its
    config.json alone (a run sized before the download)."""
    from mlx_lm.utils import load_config, load_model

    if not (path / "config.json").is_file():
        raise BadInput(f"not an mlx-lm model folder (no config.json): {path}")
    check_folder(path)  # an architecture the fused loss reproduces (config.json alone: mlx-lm's)
    if list(path.glob("model*.safetensors")):
        return Skeleton(*load_model(path, lazy=True), path)
    config = load_config(path)
    try:
        model = config_skeleton(config)
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path / 'config.json'}: mlx-lm cannot build this model ({e})") from None
    return Skeleton(model, config, f"{path} holds no weights (config.json only)")


def _vocab(recipe: Recipe) -> int:
    if recipe.tokenizer.path:
        return len(load_tokenizer(recipe.tokenizer.path).get_vocab())
    return recipe.tokenizer.vocab_size


def teacher_skeleton(recipe: Recipe) -> Skeleton | None:
    """The local teacher (its folder, the one the teacher stage trained, or the recipe's
    teacher.model); None for an API teacher."""
    t = recipe.teacher
    if t.kind != "local":
        return None
    trained = Path(recipe.runs_dir) / recipe.name / "teacher" / "teacher.json"
    path = t.path or (json.loads(trained.read_text())["path"] if trained.exists() else None)
    if path:
        return folder_skeleton(Path(path))
    config = model_config_dict(t.model, _vocab(recipe))
    return Skeleton(model_from_config(config), config, None)


def student_skeleton(recipe: Recipe) -> Skeleton:
    """The student as the distill stage builds it (before adapters), with lazy weights."""
    s = recipe.student
    if s.init == "pretrained":
        return folder_skeleton(Path(s.path))
    if s.init == "teacher_layers":
        teacher = teacher_skeleton(recipe)
        if teacher is None:
            raise BadInput("recipe key student.init: teacher_layers needs a local teacher")
        config = dict(teacher.config)
        n = config["num_hidden_layers"]
        keep = set(s.layers) if s.layers else set(range(0, n, s.layer_stride)) | {n - 1}
        config["num_hidden_layers"] = len(keep)
        config.pop("quantization", None)
        # the cut's speed is the same with fresh weights; they are at hand when the teacher's are
        weights = teacher.weights if isinstance(teacher.weights, str) else None
        return Skeleton(model_from_config(config), config, weights)
    config = model_config_dict(s.model, _vocab(recipe))
    return Skeleton(model_from_config(config), config, None)


def eval_students(recipe: Recipe) -> int:
    """How many students the eval stage loads besides the teacher."""
    students = 1 + ("baseline" in recipe.stages) + len(recipe.distill.compare)
    if recipe.refine.steps:  # both phases are evaluated
        students += 1 + ("baseline" in recipe.stages)
    return students


def device_memory() -> tuple[int, str]:
    """Bytes this device can use, and where the number comes from."""
    if backend.device() == "metal":
        info = mx.device_info()
        size = info.get("max_recommended_working_set_size")
        if size:
            return int(size), "Metal recommended working set"
    if backend.device() == "cuda":
        return int(mx.device_info().get("memory_size", 0)), "GPU memory"
    return backend.memory_bytes(), "RAM"


def plan_recipe(recipe: Recipe, stages: list[str] | None = None, jobs: int = 1) -> dict:
    """Predicted peak of each stage of `recipe` (those in `stages`, default all its stages);
    with `jobs` > 1 distill and baseline train side by side, so their sum must fit too.

    Also checks the adapter setting against the student (BadInput for what mlx-lm cannot do).
    """
    stages = [st for st in recipe.stages if stages is None or st in stages]
    t = recipe.train
    seq = recipe.data.max_seq_len
    out: dict[str, dict] = {}
    # Lazy random weights draw from MLX's global key; every stage seeds before it builds.
    teacher = teacher_skeleton(recipe)
    teacher_shape = shape_of(teacher.model, teacher.config) if teacher else None
    student = None
    if {"distill", "baseline", "eval"} & set(stages):
        built = student_skeleton(recipe)
        apply_adapters(built.model, recipe.student)  # checks keys, rank, DoRA, quantized + full
        student = shape_of(built.model, built.config, getattr(mx, t.dtype))
    if "teacher" in stages and teacher_shape and recipe.teacher.path is None:
        tt = recipe.teacher.train
        out["teacher"] = train_terms(
            teacher_shape,
            batch=tt.batch_size,
            seq=seq,
            k=0,
            kd=False,
            dtype=tt.dtype,
            grad_checkpoint=tt.grad_checkpoint,
            grad_accum=tt.grad_accum,
        )
    if "cache" in stages and teacher_shape:
        out["cache"] = score_terms(teacher_shape, batch=recipe.cache.batch_size, seq=seq + 1)
    options = dict(
        batch=t.batch_size,
        seq=seq,
        dtype=t.dtype,
        grad_checkpoint=t.grad_checkpoint,
        grad_accum=t.grad_accum,
        chunk=recipe.loss.chunk_size,
    )
    if "distill" in stages and student:
        kd = recipe.loss.kind != "ce" and recipe.teacher.kind == "local"
        out["distill"] = train_terms(student, k=recipe.cache.k, kd=kd, **options)
        modes = {recipe.distill.mode, *(c.mode for c in recipe.distill.compare)}
        if recipe.refine.steps:  # the refinement phase samples beside the teacher too
            modes.add(recipe.refine.mode)
        if modes != {"offline"} and teacher_shape:  # the teacher is loaded beside the student
            out["distill"].update(
                onpolicy_terms(teacher_shape, student, out["distill"], batch=t.batch_size, seq=seq)
            )
    if "baseline" in stages and student:
        out["baseline"] = train_terms(student, k=0, kd=False, **options)
    if "eval" in stages and student:
        e = recipe.eval
        shapes = [student] * eval_students(recipe) + ([teacher_shape] if teacher_shape else [])
        out["eval"] = eval_terms(
            shapes,
            teacher_shape,
            rows=min(32, e.num_examples),  # evaluate's perplexity and agreement batches
            seq=seq,
            batch=min(e.batch_size, e.num_examples),
            new=e.max_new_tokens,
        )
    budget, source = device_memory()
    result = {"device_bytes": budget, "device_source": source, "stages": {}}
    for name, terms in out.items():
        result["stages"][name] = {"peak_bytes": sum(terms.values()), "terms": terms}
    if jobs > 1 and {"distill", "baseline"} <= set(out):
        both = {f"{k}_{n}": v for n in ("distill", "baseline") for k, v in out[n].items()}
        result["stages"]["distill+baseline"] = {"peak_bytes": sum(both.values()), "terms": both}
    result["fits"] = all(v["peak_bytes"] <= budget for v in result["stages"].values())
    return result


def advice(recipe: Recipe, plan: dict) -> str:
    """What to change, in one line, for the stages that do not fit."""
    budget = plan["device_bytes"]
    over = [n for n, v in plan["stages"].items() if v["peak_bytes"] > budget]
    tips = []
    if "distill+baseline" in over:
        tips.append("--jobs 1")
    if {"distill", "baseline", "teacher"} & set(over):
        t = recipe.train
        if not t.grad_checkpoint:
            tips.append("train.grad_checkpoint=true")
        if recipe.student.train == "full":
            tips.append("student.train=lora")
        tips.append(f"train.grad_accum={t.grad_accum * 2} (or a smaller train.batch_size)")
    if "cache" in over:
        tips.append("a smaller cache.batch_size or a 4-bit teacher")
    if "eval" in over:
        tips.append("a smaller eval.batch_size or a 4-bit teacher")
    return ", ".join(tips)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def format_table(plan: dict) -> str:
    """The plan as a small text table (with a time column when the plan was timed)."""
    budget = plan["device_bytes"]
    lines = [f"memory plan ({plan['device_source']}: {budget / GB:.1f} GB usable)"]
    untimed = []
    for name, v in plan["stages"].items():
        peak = v["peak_bytes"]
        top = sorted(v["terms"].items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{k} {b / GB:.2f}" for k, b in top)
        mark = "ok" if peak <= budget else "DOES NOT FIT"
        time = ""
        if "time" in v:
            seconds = v["time"]["seconds"]
            time = f"{'~' + _duration(seconds) if seconds is not None else '-':>9}  "
            if seconds is None:
                untimed.append(f"{name}: {v['time']['why']}")
        lines.append(f"  {name:<16} {peak / GB:7.2f} GB  {mark:<12} {time}({parts})")
    if untimed:
        lines.append("  time not estimated for " + "; ".join(untimed))
    return "\n".join(lines)


def check_recipe(recipe: Recipe, stages: list[str] | None = None, jobs: int = 1) -> dict:
    """`plan_recipe`, refusing (BadInput) a run predicted not to fit this device."""
    plan = plan_recipe(recipe, stages, jobs)
    if not plan["fits"] and not os.environ.get("MLX_DISTILL_NO_PLAN_CHECK"):
        over = [kv for kv in plan["stages"].items() if kv[1]["peak_bytes"] > plan["device_bytes"]]
        single = [kv for kv in over if "+" not in kv[0]]  # name a stage before a pair of them
        worst = max(single or over, key=lambda kv: kv[1]["peak_bytes"])
        raise BadInput(
            f"stage {worst[0]} is predicted to need {worst[1]['peak_bytes'] / GB:.1f} GB, more "
            f"than the {plan['device_bytes'] / GB:.1f} GB this device can use "
            f"({plan['device_source']}); try {advice(recipe, plan)} (mlx-distill plan RECIPE)"
        )
    return plan
