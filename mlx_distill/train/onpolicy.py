"""On-policy distillation: the student writes, the local teacher grades every token.

`OnPolicySource` is a batch source for the trainer's one loop, in place of the cache loader. An
on-policy batch takes the next P = batch_size / samples_per_prompt training prompts, samples
completions from the current student (`sampler.sample_completions`), scores the student's
sequences with the teacher in one forward pass, and hands the trainer a batch tagged
"on_policy" that it trains with the on-policy loss (`onpolicy_loss`). In `mixed` mode each batch
is on-policy with probability lmbda, else the cache loader's next batch (GKD). With
`distill.offline_steps` the first batches of either mode come from the cache: the student learns
off-policy first, so that its samples are close enough to the teacher's to be worth grading.

Randomness is indexed by the batch number: (seed, batch index) fixes the mixed-mode coin and the
sampling key. The sampler's RNG state in a checkpoint is therefore the batch count, the prompt
stream position and the cache loader's own state, and a resumed run draws what an uninterrupted
one would have drawn.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from mlx_distill.cache.sparse import tempered_logprobs, topk_targets
from mlx_distill.errors import BadInput
from mlx_distill.kernels import SparseTargets
from mlx_distill.kernels.loss import choose_chunk
from mlx_distill.models import hidden_states, lm_head_weight
from mlx_distill.recipe import DistillConfig, LossConfig
from mlx_distill.text.tokenizer import template_hash, vocab_hash
from mlx_distill.train.loss import make_loss
from mlx_distill.train.sampler import sample_completions

LOSS_TAG = "on_policy"
# Distinct RNG streams derived from the recipe seed.
_COIN, _PROMPTS, _SAMPLER = 1, 2, 3
WIDTH_STEP = 32


class OnPolicyBatch(NamedTuple):
    """A `Batch` (tokens, labels, mask (B, L); targets (B, L, k)) the trainer trains with the
    loss named by `loss`. For sampled_token, targets hold k=1: the sampled token and the
    teacher's log-prob of it at temperature 1."""

    tokens: mx.array
    labels: mx.array
    mask: mx.array
    targets: SparseTargets
    loss: str = LOSS_TAG


def check_templates(student_tokenizer, teacher_tokenizer, teacher: str) -> None:
    """Refuse on-policy distillation when student and teacher would read the text differently."""
    if vocab_hash(student_tokenizer) != vocab_hash(teacher_tokenizer):
        raise BadInput(
            f"on-policy distillation: the student's tokenizer differs from the teacher's "
            f"({teacher}); use the teacher's tokenizer (tokenizer.path)"
        )
    if template_hash(student_tokenizer) != template_hash(teacher_tokenizer):
        raise BadInput(
            f"on-policy distillation: the student's chat template differs from the teacher's "
            f"({teacher}); the teacher would score text in a format it was not trained on"
        )


# -- the sampled-token estimator ------------------------------------------------------------


def _chunk_logprobs(h: mx.array, W: mx.array, y: mx.array) -> mx.array:
    z = (h @ W.T).astype(mx.float32)
    return mx.take_along_axis(z, mx.stop_gradient(y)[:, None], axis=-1)[:, 0] - mx.logsumexp(
        z, axis=-1
    )


# Recomputed in the backward pass: only one (chunk, V) block of logits is alive at a time.
_chunk_logprobs_ckpt = mx.checkpoint(_chunk_logprobs)


def token_logprobs(
    hidden: mx.array, weight: mx.array, ids: mx.array, chunk: int | None = None
) -> mx.array:
    """log softmax(hidden @ weight.T)[ids]: hidden (N, d), weight (V, d), ids (N,) -> (N,).

    Row chunks of `chunk` tokens (default: the fused loss's memory budget) are recomputed in
    the backward pass, so only one (chunk, V) block of logits is alive at a time."""
    N, V = hidden.shape[0], weight.shape[0]
    chunk = chunk or choose_chunk(N, V, 4, dense=False, extra_exp=False)
    parts = [
        _chunk_logprobs_ckpt(hidden[i : i + chunk], weight, ids[i : i + chunk])
        for i in range(0, N, chunk)
    ]
    return mx.concatenate(parts)


def sampled_token_objective(hidden, weight, labels, teacher_logprobs, mask, chunk=None):
    """Tinker's on-policy estimator: per-token log-ratio of the sampled token only.

    hidden (N, d), weight (V, d); labels (N,) the sampled tokens x_t; teacher_logprobs (N,)
    log p(x_t) of the teacher; mask (N,) bool. loss = mean over masked t of
    sg(log q(x_t) - log p(x_t)) * log q(x_t), q the student: its gradient is the score-function
    estimate of grad KL(q || p) per token (no sum over later tokens, Tinker's
    `kl_discount_factor=0`). Metrics: ce = mean -log q(x_t), kd = the mean log-ratio (a
    reverse-KL estimate), covered_mass = mean p(x_t).
    """
    keep = mask.astype(mx.bool_)
    y = mx.where(keep, labels, 0).astype(mx.int32)
    lq = token_logprobs(hidden, weight, y, chunk)
    lp = mx.where(keep, teacher_logprobs.astype(mx.float32), 0.0)
    ratio = mx.stop_gradient(lq - lp)
    count = mx.maximum(keep.astype(mx.float32).sum(), 1.0)

    def mean(x):
        return mx.where(keep, x, 0.0).sum() / count

    loss = mean(ratio * lq)
    metrics = {"ce": -mean(lq), "kd": mean(ratio), "covered_mass": mean(mx.exp(lp))}
    return loss, {k: mx.stop_gradient(v) for k, v in metrics.items()}


def sampled_token_loss(model, tokens, labels, mask, ids, logprobs):
    """The trainer's loss_fn for sampled_token batches: targets hold the teacher's log-prob of
    the sampled token in logprobs[..., 0] (`ids` repeats the labels and is unused)."""
    del ids
    hidden = hidden_states(model, tokens)
    h = hidden.reshape(-1, hidden.shape[-1])
    return sampled_token_objective(
        h, lm_head_weight(model), labels.reshape(-1), logprobs[..., 0].reshape(-1), mask.reshape(-1)
    )


def onpolicy_loss(cfg: DistillConfig, loss: LossConfig):
    """The trainer loss for on-policy batches: the fused distill_loss (no CE term: the labels
    are the student's own samples) or the sampled-token estimator."""
    if cfg.loss == "sampled_token":
        return sampled_token_loss
    kd = LossConfig(
        kind=cfg.loss,
        kd_weight=1.0,
        temperature=loss.temperature,
        beta=loss.beta,
        tail="bucket",
        chunk_size=loss.chunk_size,
    )
    return make_loss(kd)


# -- teacher scoring ------------------------------------------------------------------------


def score_sequences(
    teacher, tokens: np.ndarray, labels: np.ndarray, mask: np.ndarray, *, k: int, temperature: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher targets on a batch of the student's sequences, one forward pass per row chunk.

    teacher: a `LocalTeacher`. tokens, labels (B, L) int32 and mask (B, L) bool as in a `Batch`.
    Returns ids (B, L, k) int32 and logprobs (B, L, k) float32 (the teacher's top-k at
    `temperature`, sorted; unmasked positions hold the label with log-prob 0 in slot 0 and -inf
    elsewhere), and chosen (B, L) float32: the teacher's log-prob of each label at temperature 1.
    """
    B, L = tokens.shape
    ids = np.zeros((B, L, k), np.int32)
    lps = np.full((B, L, k), -np.inf, np.float32)
    chosen = np.zeros((B, L), np.float32)
    rows = max(1, teacher.max_logits_bytes // (teacher.vocab_size * L * 4))
    for r0 in range(0, B, rows):
        logits = teacher._logits(mx.array(tokens[r0 : r0 + rows]))
        y = mx.array(labels[r0 : r0 + rows])
        lse = mx.logsumexp(logits, axis=-1)
        picked = mx.take_along_axis(logits, y[..., None], axis=-1)[..., 0] - lse
        top, vals = topk_targets(tempered_logprobs(logits, temperature), k)
        kk = top.shape[-1]
        ids[r0 : r0 + rows, :, :kk] = top
        lps[r0 : r0 + rows, :, :kk] = vals
        chosen[r0 : r0 + rows] = np.array(picked)
    # Positions without loss: a valid one-hot distribution, as the cache loader writes them.
    ids[~mask] = 0
    lps[~mask] = -np.inf
    ids[~mask, 0] = labels[~mask]
    lps[~mask, 0] = 0.0
    chosen[~mask] = 0.0
    return ids, lps, chosen


# -- the batch source -----------------------------------------------------------------------


class OnPolicySource:
    """Endless on-policy (or mixed) batches for `trainer.train`, resumable like `Loader`.

    model: the student being trained (sampled with its current weights at every batch).
    teacher: a `LocalTeacher`. prompts: chat-formatted prompt token ids, one array per training
    prompt. cfg: the recipe's `distill` section. batch_size B sequences of L = seq_len input
    tokens. temperature: the loss temperature the top-k targets are taken at. eos_ids: tokens
    that end an answer. vocab_size: ids the student may sample. cache: the cache `Loader`
    (mixed mode only).
    """

    def __init__(
        self,
        model,
        teacher,
        prompts: Sequence[np.ndarray],
        cfg: DistillConfig,
        *,
        batch_size: int,
        seq_len: int,
        temperature: float,
        eos_ids: Sequence[int],
        vocab_size: int,
        seed: int = 0,
        cache=None,
    ) -> None:
        if cfg.mode not in ("on_policy", "mixed"):
            raise BadInput(f"OnPolicySource: mode {cfg.mode!r} is not on_policy or mixed")
        if cfg.reads_cache() and cache is None:
            raise BadInput(f"distill.mode {cfg.mode} with these settings needs the teacher cache")
        if not prompts:
            raise BadInput("on-policy distillation: no training prompts")
        if batch_size % cfg.samples_per_prompt:
            raise BadInput("distill.samples_per_prompt must divide train.batch_size")
        self.model, self.teacher, self.prompts, self.cfg = model, teacher, list(prompts), cfg
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.temperature, self.eos_ids, self.vocab_size = temperature, list(eos_ids), vocab_size
        self.cache = cache
        self._batches = 0  # batches handed out (on-policy and cached)
        self._prompt_position = 0  # stream index of the next prompt
        self._perm_epoch, self._perm = -1, np.arange(len(self.prompts))
        self.seconds = {"gen": 0.0, "score": 0.0}
        self.counts = {"samples": 0, "gen_tokens": 0, "score_tokens": 0, "on_policy": 0}

    def _prompt_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.prompts))
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, _PROMPTS, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.prompts)), epoch
        return int(self._perm[offset])

    def __iter__(self) -> OnPolicySource:
        return self

    def __next__(self):
        index = self._batches
        self._batches += 1
        if index < self.cfg.offline_steps:  # the off-policy warm start
            return next(self.cache)
        if self.cfg.mode == "mixed":
            coin = np.random.default_rng([self.seed, _COIN, index]).random()
            if coin >= self.cfg.lmbda:
                return next(self.cache)
        return self._on_policy_batch(index)

    def _on_policy_batch(self, index: int) -> OnPolicyBatch:
        cfg, B, L = self.cfg, self.batch_size, self.seq_len
        n_prompts = B // cfg.samples_per_prompt
        chosen = [self._prompt_at(self._prompt_position + i) for i in range(n_prompts)]
        self._prompt_position += n_prompts
        prompts = [self.prompts[i] for i in chosen]
        seed = int(np.random.default_rng([self.seed, _SAMPLER, index]).integers(2**31))
        t0 = time.perf_counter()
        completions = sample_completions(
            self.model,
            prompts,
            samples=cfg.samples_per_prompt,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            eos_ids=self.eos_ids,
            vocab_size=self.vocab_size,
            key=mx.random.key(seed),
        )
        t1 = time.perf_counter()
        tokens = np.zeros((B, L), np.int32)
        labels = np.zeros((B, L), np.int32)
        mask = np.zeros((B, L), bool)
        scored = 0
        for b, completion in enumerate(completions):
            prompt = prompts[b // cfg.samples_per_prompt]
            seq = np.concatenate([prompt, completion]).astype(np.int32)
            n_in, n_lab = min(len(seq), L), min(len(seq) - 1, L)
            tokens[b, :n_in] = seq[:n_in]
            scored += n_in
            labels[b, :n_lab] = seq[1 : n_lab + 1]
            # train on the label positions that are completion tokens
            mask[b, max(0, len(prompt) - 1) : n_lab] = True
        # Only as wide as the longest sequence, in steps of WIDTH_STEP (each new width is one
        # more compiled training step); causal attention makes the cut exact.
        used = np.flatnonzero(mask.any(axis=0))
        last = int(used[-1]) + 1 if used.size else 1
        width = min(L, -(-last // WIDTH_STEP) * WIDTH_STEP)
        tokens, labels, mask = tokens[:, :width], labels[:, :width], mask[:, :width]
        ids, lps, picked = score_sequences(
            self.teacher, tokens, labels, mask, k=cfg.k, temperature=self.temperature
        )
        if cfg.loss == "sampled_token":
            ids, lps = labels[..., None], picked[..., None]
        t2 = time.perf_counter()
        self.seconds["gen"] += t1 - t0
        self.seconds["score"] += t2 - t1
        self.counts["samples"] += len(completions)
        self.counts["gen_tokens"] += sum(len(c) for c in completions)
        self.counts["score_tokens"] += scored
        self.counts["on_policy"] += 1
        return OnPolicyBatch(
            mx.array(tokens),
            mx.array(labels),
            mx.array(mask),
            SparseTargets(mx.array(ids), mx.array(lps)),
        )

    def stats(self) -> dict[str, float]:
        """Throughput of generation and teacher scoring since this process started."""
        gen, score = max(self.seconds["gen"], 1e-9), max(self.seconds["score"], 1e-9)
        return {
            "gen_samples_per_s": self.counts["samples"] / gen,
            "gen_tokens_per_s": self.counts["gen_tokens"] / gen,
            "score_samples_per_s": self.counts["samples"] / score,
            "score_tokens_per_s": self.counts["score_tokens"] / score,
            "gen_s": self.seconds["gen"],
            "score_s": self.seconds["score"],
            "on_policy_batches": float(self.counts["on_policy"]),
        }

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def state_dict(self) -> dict:
        """JSON-able position (the sampler's RNG state included: it is indexed by batch)."""
        return {
            "kind": "on_policy",
            "mode": self.cfg.mode,
            "lmbda": self.cfg.lmbda,
            "offline_steps": self.cfg.offline_steps,
            "seed": self.seed,
            "prompts": len(self.prompts),
            "batch_size": self.batch_size,
            "samples_per_prompt": self.cfg.samples_per_prompt,
            "batches": self._batches,
            "prompt_position": self._prompt_position,
            "cache": self.cache.state_dict() if self.cache is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        expect = self.state_dict()
        state = {"offline_steps": 0, **state}  # checkpoints from before the key
        keys = ("kind", "mode", "lmbda", "offline_steps", "seed", "prompts", "batch_size")
        for key in (*keys, "samples_per_prompt"):
            if state.get(key) != expect[key]:
                raise BadInput(
                    f"on-policy state does not match this run: {key} is {state.get(key)!r} in "
                    f"the checkpoint, {expect[key]!r} now"
                )
        self._batches = int(state["batches"])
        self._prompt_position = int(state["prompt_position"])
        if self.cache is not None:
            self.cache.load_state_dict(state["cache"])
