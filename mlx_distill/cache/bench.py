"""`mlx-distill bench cache`: cache write speed, loader speed, size, and loader/trainer ratio.

What is measured, on quickstart-sized synthetic data (vocabulary 384, sequences of 60-160 tokens
whose last ~60% is the trained answer, a randomly initialized teacher of the quickstart's teacher
shape, ~6M parameters):

- write_rows_per_s: `build_token_cache` end to end (teacher forward, top-k, encoding, fsynced
  shards); encode_write_rows_per_s: the same without the time spent inside `teacher.score`.
- loader_tokens_per_s: B x L token slots per second handed out by `Loader` over the cache
  (decoding, batch assembly, prefetch thread, conversion to `mx.array`), batch 32, L = 160.
- trainer_tokens_per_s: the consumption the loader must keep up with. We time real training
  steps of the quickstart student (recipe defaults: d = 128, 2 layers) on the same batches:
  forward, `distill_loss` (forward KL on the cached top-k + CE, fused LM head), backward, AdamW
  update, one `mx.eval` per step; warm-up steps are not timed.
- loader_to_trainer_ratio = loader_tokens_per_s / trainer_tokens_per_s (target >= 20: the loader
  then costs the trainer under 5% even without prefetch).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from mlx_distill.text.examples import TokenizedExample


def _examples(n: int, vocab: int, seq_len: int, seed: int) -> list[TokenizedExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = int(rng.integers(60, seq_len + 1))
        mask = np.zeros(T, dtype=bool)
        mask[int(T * 0.4) :] = True
        out.append(TokenizedExample(rng.integers(4, vocab, T), mask, {"id": i}))
    return out


def _word_tokenizer(vocab: int):
    """A real HF fast tokenizer with `vocab` word-level tokens (the teacher needs its map)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    ids = {f"w{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=ids, unk_token="w1"))
    )


def bench_cache(
    rows: int = 128,
    batch_size: int = 32,
    seq_len: int = 160,
    vocab: int = 384,
    k: int = 16,
    loader_batches: int = 40,
    train_steps: int = 5,
    seed: int = 0,
) -> dict:
    """Run the cache benchmark (see module docstring); returns a JSON-able dict."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_distill.cache import build_token_cache, cache_info, open_cache
    from mlx_distill.cache.loader import Loader
    from mlx_distill.kernels import distill_loss
    from mlx_distill.models import build_model, hidden_states, lm_head_weight
    from mlx_distill.recipe import ModelConfig, TeacherConfig
    from mlx_distill.teachers.local import LocalTeacher

    mx.random.seed(seed)
    teacher_model, _ = build_model(TeacherConfig().model, vocab)
    teacher = LocalTeacher((teacher_model, _word_tokenizer(vocab)), name="bench-teacher")
    examples = _examples(rows, vocab, seq_len, seed)
    scoring = [0.0]
    score = teacher.score

    def timed_score(*args, **kwargs):
        t = time.perf_counter()
        out = score(*args, **kwargs)
        scoring[0] += time.perf_counter() - t
        return out

    teacher.score = timed_score
    result: dict = {"rows": rows, "vocab": vocab, "k": k, "batch_size": batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        t0 = time.perf_counter()
        build_token_cache(teacher, examples, path, k=k, batch_size=batch_size, progress=False)
        write_s = time.perf_counter() - t0
        info = cache_info(path)
        result["write_rows_per_s"] = round(rows / write_s, 1)
        result["encode_write_rows_per_s"] = round(rows / max(write_s - scoring[0], 1e-9), 1)
        result["bytes_per_token"] = info["bytes_per_token"]
        result["bytes_per_target_position"] = info["bytes_per_target_position"]

        small = Path(tmp) / "k32"
        build_token_cache(
            teacher, examples[:64], small, k=32, batch_size=batch_size, progress=False
        )
        result["bytes_per_target_position_k32"] = cache_info(small)["bytes_per_target_position"]

        cache = open_cache(path)
        loader = Loader(cache, batch_size=batch_size, seq_len=seq_len, seed=seed)
        batches = [next(loader) for _ in range(2)]  # warm-up: maps and checks every shard
        t0 = time.perf_counter()
        for _ in range(loader_batches):
            b = next(loader)
            mx.eval(b.tokens, b.labels, b.mask, b.targets.ids, b.targets.logprobs)
        loader_s = time.perf_counter() - t0
        loader.close()
        result["loader_tokens_per_s"] = round(loader_batches * batch_size * seq_len / loader_s)

    student, _ = build_model(ModelConfig(), vocab)
    optimizer = optim.AdamW(learning_rate=1e-3)

    def loss_fn(batch):
        hidden = hidden_states(student, batch.tokens)
        loss, _ = distill_loss(
            hidden,
            lm_head_weight(student),
            batch.targets,
            labels=batch.labels,
            mask=batch.mask,
            kd_weight=0.5,
        )
        return loss

    step = nn.value_and_grad(student, loss_fn)
    timings = []
    for i in range(train_steps + 2):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss, grads = step(batch)
        optimizer.update(student, grads)
        mx.eval(loss, student.parameters(), optimizer.state)
        timings.append(time.perf_counter() - t0)
    step_s = float(np.median(timings[2:]))
    result["trainer_step_s"] = round(step_s, 4)
    result["trainer_tokens_per_s"] = round(batch_size * seq_len / step_s)
    result["loader_to_trainer_ratio"] = round(
        result["loader_tokens_per_s"] / result["trainer_tokens_per_s"], 1
    )
    return result
