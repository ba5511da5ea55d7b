"""`mlx-distill plan`'s wall-time estimate per stage, from a few timed steps at the run's shapes.

Each probe is the stage's own model cut to its first `PROBE_LAYERS` blocks (real width,
vocabulary, dtype and quantization; a model folder's own weights, of which only those blocks
are read), run at the recipe's batch and sequence length: `TIMED_STEPS` training steps of the
fused loss after a compiling one (teacher, distill, baseline), one scoring batch (cache),
`PROBE_TOKENS` greedy tokens at the eval batch size (eval). The probe's time is scaled to the
whole model by the ratio of their matmul work per token (`work`), then by the recipe's steps,
training rows and eval problems. The probe never holds more than the embeddings, the head and
`PROBE_LAYERS` blocks, so it stays bounded on a large model. A stage whose weights are not at
hand (a folder holding config.json only) is not estimated, and says why.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_distill import backend
from mlx_distill.evaluate import SAMPLES
from mlx_distill.models import contract
from mlx_distill.models.adapters import apply_adapters
from mlx_distill.plan import (
    Shape,
    Skeleton,
    config_skeleton,
    eval_students,
    shape_of,
    student_skeleton,
    teacher_skeleton,
)
from mlx_distill.recipe import Recipe, TrainConfig

PROBE_LAYERS = 2
TIMED_STEPS = 2  # training steps timed after the compiling one
PROBE_TOKENS = 3  # greedy tokens timed after a prefill and one untimed token
EVAL_ROWS = 32  # evaluate's perplexity and agreement batch
LOGITS_BYTES = 256 << 20  # LocalTeacher's max_logits_mb: the rows one scoring pass holds


class NotTimed(Exception):
    """Why a stage's time is not estimated."""


def work(s: Shape, seq: int) -> float:
    """Multiply-adds per token: every weight once except an untied embedding table (a lookup;
    a tied table is the head's matmul), and attention over seq / 2 earlier positions on average
    (q.k and p.v)."""
    return s.values - (0 if s.tied else s.vocab * s.d) + s.layers * seq * s.d


def train_rows(recipe: Recipe) -> int:
    """Training rows: data.train's records, at most data.max_train."""
    path = Path(recipe.data.train or "")
    if not path.is_file():
        raise NotTimed(f"data.train {recipe.data.train!r} is not a local file to count rows in")
    with path.open("rb") as f:
        rows = sum(1 for line in f if line.strip())
    return min(rows, recipe.data.max_train or rows)


def probe_model(built: Skeleton) -> tuple[nn.Module, dict]:
    """`built` cut to its first PROBE_LAYERS blocks, weights evaluated: its folder's own (only
    those blocks are read) or, when the recipe builds it, fresh random ones."""
    from mlx_lm.utils import load_model

    if isinstance(built.weights, str):
        raise NotTimed(built.weights)
    cut = dict(built.config, num_hidden_layers=min(built.config["num_hidden_layers"], PROBE_LAYERS))
    if built.weights is None:
        model = config_skeleton(cut)
    else:  # strict=False: the blocks past the cut are in the files, not in the model
        model, _ = load_model(built.weights, lazy=True, strict=False, model_config=cut)
    mx.eval(model.parameters())
    contract(model)  # the head contract, proven before a compiled step traces the model
    return model, cut


def _seconds(fn, repeat: int) -> float:
    """Median wall seconds of `fn` (its result evaluated) after one untimed call."""
    mx.eval(fn())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def train_step_seconds(model: nn.Module, recipe: Recipe, train: TrainConfig, kd: bool) -> float:
    """Seconds of one training step at train.batch_size x data.max_seq_len (KD: top-k targets)."""
    import mlx.optimizers as optim

    from mlx_distill.train.loss import make_loss
    from mlx_distill.train.recompute import checkpoint_blocks
    from mlx_distill.train.step import make_master, make_step

    model.set_dtype(getattr(mx, train.dtype))  # as the trainer casts the student
    master = make_master(model) if train.dtype != "float32" else None
    optimizer = optim.AdamW(learning_rate=1e-6)
    loss = make_loss(recipe.loss if kd else None)
    step = make_step(model, optimizer, loss, train, master)
    if train.grad_checkpoint:
        checkpoint_blocks(model)
    rng = np.random.default_rng(0)
    B, L, V, k = train.batch_size, recipe.data.max_seq_len, model.args.vocab_size, recipe.cache.k
    tokens = mx.array(rng.integers(0, V, (B, L)), dtype=mx.int32)
    ids = mx.array(rng.integers(0, V, (B, L, k)), dtype=mx.int32) if kd else None
    lp = mx.array(np.log(rng.dirichlet(np.ones(k), (B, L)) * 0.9), mx.float32) if kd else None
    arrays = (tokens, tokens, mx.ones((B, L), dtype=mx.bool_), ids, lp)
    state = [model.state, optimizer.state] + ([master] if master else [])
    model.train()
    return _seconds(lambda: (step(arrays), state), TIMED_STEPS)


def score_seconds(model: nn.Module, recipe: Recipe) -> float:
    """Seconds of one scoring batch (cache.batch_size rows of max_seq_len + 1 tokens): the
    forward pass, the logits, the log-probs and the top-k, as `LocalTeacher.score` runs them
    (one pass of as many rows as it takes at once, timed, times the passes of a batch)."""
    from mlx_distill.cache.sparse import tempered_logprobs
    from mlx_distill.models import hidden_states, lm_head

    if backend.device() == "cpu":  # LocalTeacher scores in float32 there
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
    head, c = lm_head(model), recipe.cache
    T, V = recipe.data.max_seq_len + 1, model.args.vocab_size
    rows = max(1, min(c.batch_size, LOGITS_BYTES // (V * T * 4)))  # rows per forward pass
    tokens = mx.array(np.random.default_rng(0).integers(0, V, (rows, T)))

    def one_pass():
        lp = tempered_logprobs(head.logits(hidden_states(model, tokens)), c.temperature)
        return mx.argpartition(-lp, kth=c.k - 1, axis=-1)[..., : c.k]

    return _seconds(one_pass, 1) * math.ceil(c.batch_size / rows)


def forward_seconds(model: nn.Module, recipe: Recipe) -> float:
    """Seconds of one teacher-forced pass of the eval stage (perplexity, top-1 agreement):
    min(32, eval.num_examples) rows of max_seq_len tokens, their logits' argmax."""
    from mlx_distill.models import hidden_states, lm_head

    head = lm_head(model)
    shape = (min(EVAL_ROWS, recipe.eval.num_examples), recipe.data.max_seq_len)
    tokens = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, shape))
    return _seconds(lambda: mx.argmax(head.logits(hidden_states(model, tokens)), axis=-1), 1)


def decode_seconds(model: nn.Module, recipe: Recipe) -> float:
    """Seconds per greedy token of a batch of min(eval.batch_size, eval.num_examples) rows."""
    from mlx_lm.models.cache import make_prompt_cache

    B = max(1, min(recipe.eval.batch_size, recipe.eval.num_examples))
    cache = make_prompt_cache(model)
    prompt = np.random.default_rng(0).integers(0, model.args.vocab_size, (B, 16))
    mx.eval(model(mx.array(prompt), cache=cache))
    token = mx.zeros((B, 1), dtype=mx.int32)
    return _seconds(lambda: mx.argmax(model(token, cache=cache)[:, -1], axis=-1), PROBE_TOKENS)


def _scaled(seconds: float, probe: nn.Module, cut: dict, full: Shape, seq: int) -> float:
    """A probe's time scaled to the whole model by their work per token."""
    return seconds * work(full, seq) / work(shape_of(probe, cut), seq)


def _row(per: float, units: int, what: str) -> dict:
    """`units` (steps, batches) of `per` seconds each."""
    basis = f"{units} {what} x {per:.3g} s"
    return {"seconds": round(per * units, 1), "per": per, "units": units, "basis": basis}


def estimate(recipe: Recipe, stages: list[str]) -> dict[str, dict]:
    """{stage: {"seconds", "basis"}} for each of `stages` that runs a model, or {"seconds":
    None, "why"} where the weights are not at hand (or the stage is not timed)."""
    seq = recipe.data.max_seq_len
    teacher = teacher_skeleton(recipe)
    student = student_skeleton(recipe) if {"distill", "baseline", "eval"} & set(stages) else None
    full: dict[str, Shape] = {}
    if teacher is not None:
        full["teacher"] = shape_of(teacher.model, teacher.config)
    if student is not None:
        apply_adapters(student.model, recipe.student)
        full["student"] = shape_of(student.model, student.config)
    built = {"teacher": teacher, "student": student}

    def train_time(role: str, train: TrainConfig, kd: bool, steps: int) -> dict:
        model, cut = probe_model(built[role])
        if role == "student":
            apply_adapters(model, recipe.student)
        per = _scaled(train_step_seconds(model, recipe, train, kd), model, cut, full[role], seq)
        return _row(per, steps, "steps")

    out: dict[str, dict] = {}
    for stage in stages:
        try:
            if stage == "teacher" and teacher is not None and recipe.teacher.path is None:
                t = recipe.teacher.train
                out[stage] = train_time("teacher", t, False, t.steps)
            elif stage == "cache" and teacher is not None:
                rows = train_rows(recipe)
                model, cut = probe_model(teacher)
                per = _scaled(score_seconds(model, recipe), model, cut, full["teacher"], seq)
                batches = math.ceil(rows / recipe.cache.batch_size)
                out[stage] = _row(per, batches, "batches")
            elif stage == "distill" and student is not None:
                if recipe.distill.mode != "offline" or recipe.refine.steps:
                    raise NotTimed("on-policy sampling is not timed")
                kd = recipe.loss.kind != "ce" and teacher is not None
                steps = recipe.train.steps * (1 + len(recipe.distill.compare))
                out[stage] = train_time("student", recipe.train, kd, steps)
            elif stage == "baseline" and student is not None:
                out[stage] = train_time("student", recipe.train, False, recipe.train.steps)
            elif stage == "eval" and student is not None:
                out[stage] = _eval_time(recipe, built, full)
        except NotTimed as e:
            out[stage] = {"seconds": None, "why": str(e)}
    return out


def _eval_time(recipe: Recipe, built: dict, full: dict) -> dict:
    """Every evaluated model: teacher-forced passes (perplexity; a student's top-1 agreement
    runs it and the teacher once more) and greedy tokens (the task's answers, the samples)."""
    e, seq = recipe.eval, recipe.data.max_seq_len
    passes = math.ceil(e.num_examples / min(EVAL_ROWS, e.num_examples))
    steps = math.ceil(e.num_examples / max(1, e.batch_size)) if recipe.data.task else 0
    students = eval_students(recipe)
    teacher = built["teacher"] is not None
    counts = {"teacher": 1, "student": students}
    forwards = {"teacher": passes * (1 + students), "student": students * passes * (1 + teacher)}
    total, parts = 0.0, []
    for role in [r for r in ("teacher", "student") if built[r] is not None]:
        model, cut = probe_model(built[role])
        fwd = _scaled(forward_seconds(model, recipe), model, cut, full[role], seq)
        tok = _scaled(decode_seconds(model, recipe), model, cut, full[role], seq)
        tokens = counts[role] * (steps + SAMPLES) * e.max_new_tokens
        total += forwards[role] * fwd + tokens * tok
        parts.append(f"{role}: {forwards[role]} passes x {fwd:.3g} s + {tokens} x {tok:.3g} s")
    return {"seconds": round(total, 1), "basis": ", ".join(parts)}


def add_times(recipe: Recipe, plan: dict) -> dict:
    """`plan` (from `plan.plan_recipe`) with each stage's "time" (`estimate`) added."""
    for name, t in estimate(recipe, list(plan["stages"])).items():
        plan["stages"][name]["time"] = t
    return plan
