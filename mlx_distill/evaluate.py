"""Evaluation: held-out exact match, perplexity and teacher/student top-1 agreement.

The eval stage (`stages/eval.py`) runs these on every model of a run directory.

Accuracy generates greedily (mlx-lm's batched generator) and checks the answer with the task's
checker. Perplexity and agreement are teacher-forced on the reference completions, over the
answer tokens only, and go through the hidden states and LM head in row chunks so they never
hold (tokens, V) logits for a whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlx_distill.kernels.loss import forward_only
from mlx_distill.models import Head, hidden_states, lm_head
from mlx_distill.text.chat import record_prompt
from mlx_distill.text.examples import TokenizedExample
from mlx_distill.text.tokenizer import prompt_text
from mlx_distill.train import distributed

ROW_CHUNK = 1024
SAMPLES = 3  # test prompts whose generations every report shows, for every model


def _each(items: Sequence, fn: Callable, shard: bool) -> list:
    """[fn(x) for x in items]; with `shard` (the eval stage in a distributed group) each rank
    computes every W-th item and every rank gets all results in order. The items are whole
    batches, the same as one process would make, so the results are the same too."""
    if not shard:
        return [fn(x) for x in items]

    return distributed.map_shards(items, fn)


def _batches(examples: Sequence[TokenizedExample], batch_size: int):
    """Right-padded (tokens, labels, mask) batches; mask marks answer positions."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        L = max(len(e.tokens) for e in chunk) - 1
        tokens = np.zeros((len(chunk), L), np.int32)
        labels = np.zeros((len(chunk), L), np.int32)
        mask = np.zeros((len(chunk), L), bool)
        for r, e in enumerate(chunk):
            n = len(e.tokens) - 1
            tokens[r, :n], labels[r, :n], mask[r, :n] = e.tokens[:-1], e.tokens[1:], e.mask[1:]
        yield mx.array(tokens), mx.array(labels), mx.array(mask)


def perplexity(
    model, examples: Sequence[TokenizedExample], batch_size: int = 32, shard: bool = False
) -> float:
    """exp(mean cross-entropy) over the answer tokens. shard: see `_each`."""
    head = lm_head(model)

    def batch_sum(start: int) -> list:
        """[sum of the batch's token CEs, its answer tokens]."""
        tokens, labels, mask = next(_batches(examples[start : start + batch_size], batch_size))
        n = int(mask.sum().item())
        if n == 0:
            return [0.0, 0]
        with forward_only():
            hidden = hidden_states(model, tokens)
            loss, _ = head.loss(hidden, None, kind="ce", labels=labels, mask=mask)
        return [loss.item() * n, n]

    total, count = 0.0, 0
    for part, n in _each(range(0, len(examples), batch_size), batch_sum, shard):
        total += part  # batch order, as one process adds them
        count += n
    return math.exp(total / max(count, 1))


def _argmax_rows(hidden: mx.array, head: Head) -> mx.array:
    """argmax over the vocabulary of the head's logits, in row chunks."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = [
        mx.argmax(head.logits(flat[i : i + ROW_CHUNK]), axis=-1)
        for i in range(0, flat.shape[0], ROW_CHUNK)
    ]
    return mx.concatenate(out).reshape(hidden.shape[:-1])


def top1_agreement(
    student,
    teacher,
    examples: Sequence[TokenizedExample],
    batch_size: int = 32,
    shard: bool = False,
) -> float:
    """Fraction of answer positions where student and teacher predict the same next token."""
    ws, wt = lm_head(student), lm_head(teacher)

    def batch_counts(start: int) -> list[int]:
        tokens, _, mask = next(_batches(examples[start : start + batch_size], batch_size))
        s = _argmax_rows(hidden_states(student, tokens), ws)
        t = _argmax_rows(hidden_states(teacher, tokens), wt)
        return [int(((s == t) & mask).sum().item()), int(mask.sum().item())]

    counts = _each(range(0, len(examples), batch_size), batch_counts, shard)
    return sum(a for a, _ in counts) / max(sum(n for _, n in counts), 1)


def _prompt_ids(tokenizer, prompt: str | dict) -> list[int]:
    """Ids a model continues: a user prompt, or a record's conversation before its last answer."""
    if isinstance(prompt, dict):
        text = record_prompt(tokenizer, prompt)
    else:
        text = prompt_text(tokenizer, prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str | dict],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress=None,
    shard: bool = False,
    with_ids: bool = False,
) -> list:
    """Greedy completions for chat prompts, in batches (shard: see `_each`): their texts, or
    with_ids (text, prompt ids, generated ids) for each."""
    from mlx_lm import batch_generate

    def batch_texts(start: int) -> list:
        chunk = prompts[start : start + batch_size]
        ids = [_prompt_ids(tokenizer, p) for p in chunk]
        out = batch_generate(
            model, tokenizer, ids, max_tokens=max_new_tokens, return_token_ids=with_ids
        )
        if progress is not None:
            progress.update(len(chunk))
        if with_ids:
            return [(t, p, list(g)) for t, p, g in zip(out.texts, ids, out.token_ids)]
        return list(out.texts)

    parts = _each(range(0, len(prompts), batch_size), batch_texts, shard)
    return [item for part in parts for item in part]


def exact_match(
    model,
    tokenizer,
    records: Sequence[dict],
    check: Callable[[str, str], bool],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress=None,
    shard: bool = False,
) -> tuple[float, list[tuple[str, list[int], list[int]]]]:
    """Accuracy of greedy answers on records with `prompt` and `answer`; also the outputs,
    (text, prompt ids, generated ids) each."""
    outputs = generate_answers(
        model,
        tokenizer,
        records,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        shard=shard,
        with_ids=True,
    )
    correct = [check(text, r["answer"]) for (text, _, _), r in zip(outputs, records)]
    return float(np.mean(correct)), outputs


# Edges of the first-departure histogram (answer-token positions); the last bin is open.
DEPARTURE_EDGES = (0, 8, 16, 24, 32, 48, 64)


def first_departure(own: Sequence[int], ref: Sequence[int]) -> int | None:
    """The first position at which two token sequences differ (a length difference counts at
    the shorter one's end); None when they are identical."""
    for i, (a, b) in enumerate(zip(own, ref)):
        if a != b:
            return i
    return None if len(own) == len(ref) else min(len(own), len(ref))


def exposure(model, teacher, own: Sequence, ref: Sequence, batch_size: int = 32) -> dict:
    """Exposure-bias diagnostics of `model` against `teacher` on the same prompts.

    own, ref: (prompt ids, generated ids) of the model's and of the teacher's greedy answers,
    prompt by prompt. agree_teacher_text: the model's top-1 agreement with the teacher along the
    teacher's own answers (teacher forcing); agree_own_text: along the model's answers (at each
    of its tokens, would the teacher have written the same one). departures: how many answers
    first differ from the teacher's in each `DEPARTURE_EDGES` bin; same: how many are
    identical to it.
    """

    def examples(pairs) -> list[TokenizedExample]:
        out = []
        for prompt, gen in pairs:
            tokens = np.array(list(prompt) + list(gen), np.int32)
            mask = np.zeros(len(tokens), bool)
            mask[len(prompt) :] = True
            out.append(TokenizedExample(tokens, mask))
        return [e for e in out if e.mask.any() and len(e.tokens) > 1]

    def follows(m, pairs) -> float:
        """Fraction of the answers' tokens that are `m`'s own argmax at their position."""
        exs = examples(pairs)
        head = lm_head(m)
        counts = [0, 0]
        for tokens, labels, mask in _batches(exs, batch_size):
            top = _argmax_rows(hidden_states(m, tokens), head)
            counts[0] += int(((top == labels) & mask).sum().item())
            counts[1] += int(mask.sum().item())
        return counts[0] / max(counts[1], 1)

    where = [first_departure(o[1], r[1]) for o, r in zip(own, ref)]
    edges = list(DEPARTURE_EDGES)
    counts = [0] * len(edges)
    for w in where:
        if w is not None:
            counts[int(np.searchsorted(edges, w, side="right")) - 1] += 1
    return {
        # The teacher's greedy answers are its own argmax chains, and the model's are its own:
        # one forward pass each (the other side of the agreement is the text itself).
        "agree_teacher_text": follows(model, ref),
        "agree_own_text": follows(teacher, own),
        "same": sum(w is None for w in where),
        "departures": counts,
        "departure_bins": edges,
    }


def generate_samples(
    model, tokenizer, prompts: Sequence[str | dict], *, max_new_tokens: int, shard: bool = False
) -> list[dict]:
    """Greedy completions as a person should see them: special tokens kept in the text.

    Returns one {"prompt", "output", "stopped", "new_tokens"} per prompt; `stopped` is True when
    the model emitted one of the tokenizer's end tokens, False when max_new_tokens cut it.
    """
    from mlx_lm.generate import generate_step

    stop = set(tokenizer.eos_token_ids)

    def sample(prompt) -> dict:
        ids = _prompt_ids(tokenizer, prompt)
        new: list[int] = []
        for token, _ in generate_step(mx.array(ids), model, max_tokens=max_new_tokens):
            new.append(int(token))
            if new[-1] in stop:
                break
        return {
            "prompt": prompt["prompt"] if isinstance(prompt, dict) else prompt,
            "output": tokenizer.decode(new, skip_special_tokens=False),
            "stopped": bool(new) and new[-1] in stop,
            "new_tokens": len(new),
        }

    return _each(prompts, sample, shard)
