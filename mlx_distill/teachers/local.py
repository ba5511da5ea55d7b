"""A local teacher: any mlx-lm model folder (full precision or 4/8-bit quantized).

`score` runs tokenized sequences through the model in batches and returns sparse targets
(top-k or sampled) for the positions that carry loss; `generate` / `generate_ids` answer
prompts with sampling parameters (sequence-level KD); `answer_logprobs` reads answers in the
teacher's own tokens (a teacher with another tokenizer: `teachers/cross.py` aligns its
candidates to the student's tokens). Token targets in the teacher's ids need the student's
tokenizer: compare
`teacher.vocab_hash` (the token -> id map), not only the size. Models whose embedding has more
rows than the tokenizer has ids (Qwen2.5 pads 151,665 ids to 151,936 rows) get their logits cut
to the tokenizer's ids and renormalized; a warning says so once.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_distill import backend
from mlx_distill.cache.sparse import RowTargets, sample_targets, tempered_logprobs, topk_targets
from mlx_distill.errors import BadInput
from mlx_distill.models import hidden_states, lm_head, load_model
from mlx_distill.teachers.base import Completion
from mlx_distill.text.examples import TokenizedExample
from mlx_distill.text.tokenizer import vocab_hash


class LocalTeacher:
    """An mlx-lm model as teacher.

    source: a model folder (read with `mlx_lm.load`) or a `(model, tokenizer)` pair.
    name: the teacher id in cache fingerprints (default: the folder path, or "local").
    max_logits_mb: the largest (rows, T, V) float32 logits block one forward pass may produce;
    bigger batches are split into row chunks.
    cpu_fp32: on the CPU backend, score in float32 (bf16/fp16 matmuls there are ~27x slower, and
    a quantized teacher is dequantized when its float32 copy fits in half the memory). One
    stderr line says so. The teacher's version (cache fingerprint) is taken before.
    """

    def __init__(
        self,
        source: str | Path | tuple[nn.Module, Any],
        *,
        name: str | None = None,
        max_logits_mb: int = 256,
        cpu_fp32: bool = True,
    ) -> None:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not (path / "config.json").is_file():
                raise BadInput(f"teacher folder {path}: no config.json (expected an mlx-lm model)")

            try:  # load_model proves the head contract (once per folder: the preflight did)
                model, tokenizer, config = load_model(path)
            except (ValueError, FileNotFoundError, KeyError) as e:
                raise BadInput(f"teacher folder {path}: cannot load ({e})") from None
            self.id = name or str(path)
            quant = config.get("quantization")
        else:
            model, tokenizer = source
            self.id = name or "local"
            quant = getattr(getattr(model, "args", None), "quantization", None)
        self.model = model
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.vocab_size = max(vocab.values()) + 1
        self.vocab_hash = vocab_hash(tokenizer)
        self.version = _weights_hash(model)
        self.params: dict[str, Any] = {
            "quantization": quant,
            "parameters": sum(v.size for _, v in tree_flatten(model.parameters())),
        }
        self.max_logits_bytes = max_logits_mb << 20
        self._warned_padding = False
        if cpu_fp32 and isinstance(source, (str, Path)):  # a passed-in model stays the caller's
            _fp32_on_cpu(self)

        self._head = lm_head(self.model)  # the LM-head contract: weight and logits transform

    def _hidden(self, tokens: mx.array) -> mx.array:
        return hidden_states(self.model, tokens)

    def _cut_padding(self, logits: mx.array) -> mx.array:
        """(..., V_rows) -> (..., V_tok): the rows past the tokenizer's ids removed."""
        rows = logits.shape[-1]
        if rows < self.vocab_size:
            raise BadInput(
                f"teacher {self.id}: {rows} output rows but its tokenizer has "
                f"{self.vocab_size} ids; model and tokenizer do not belong together"
            )
        if rows > self.vocab_size:
            if not self._warned_padding:
                warnings.warn(
                    f"teacher {self.id}: {rows} output rows for {self.vocab_size} tokenizer ids; "
                    f"ignoring the {rows - self.vocab_size} padded rows",
                    stacklevel=4,
                )
                self._warned_padding = True
            logits = logits[..., : self.vocab_size]
        return logits

    def _logits(self, tokens: mx.array) -> mx.array:
        """(B, T) int32 -> (B, T, V_tok) float32 logits, padded embedding rows removed."""
        return self._cut_padding(self._head.logits(self._hidden(tokens)))

    def score(
        self,
        examples: Sequence[TokenizedExample],
        *,
        targets: str = "topk",
        k: int = 16,
        samples: int = 32,
        temperature: float = 1.0,
        seed: int = 0,
        row_ids: Sequence[int] | None = None,
    ) -> list[RowTargets]:
        """Sparse targets for each example's loss positions (t with mask[t + 1]).

        examples: sequences tokenized with the teacher's tokenizer; they are right-padded into
        one (B, T) batch (causal attention: padding never affects real positions).
        targets: "topk" (k ids per position) or "sample" (RS-KD, `samples` draws per position).
        row_ids: each example's global index; the sampling RNG of a row is seeded with
        (seed, row id), so results do not depend on how rows are batched (resume-safe).
        Returns one RowTargets per example, log-probs at `temperature`.
        """
        if targets not in ("topk", "sample"):
            raise BadInput(f"cache targets {targets!r}: expected topk or sample")
        row_ids = list(range(len(examples))) if row_ids is None else list(row_ids)
        T = max(len(ex.tokens) for ex in examples)
        batch = np.zeros((len(examples), T), dtype=np.int32)
        for r, ex in enumerate(examples):
            if len(ex.tokens) and int(ex.tokens.max()) >= self.vocab_size:
                raise BadInput(
                    f"token id {int(ex.tokens.max())} is outside the teacher's "
                    f"{self.vocab_size}-id vocabulary: examples use another tokenizer"
                )
            batch[r, : len(ex.tokens)] = ex.tokens
        per_row = self.vocab_size * T * 4
        chunk = max(1, self.max_logits_bytes // per_row)
        out: list[RowTargets] = []
        for c0 in range(0, len(examples), chunk):
            rows = examples[c0 : c0 + chunk]
            logits = self._logits(mx.array(batch[c0 : c0 + chunk]))
            # Gather only the positions that carry loss: t < len - 1 with mask[t + 1].
            pos = [np.flatnonzero(ex.mask[1:]) for ex in rows]
            flat = np.concatenate([r * T + p for r, p in enumerate(pos)]).astype(np.int32)
            if flat.size == 0:
                empty = np.zeros(0, dtype=np.int32)
                out.extend(RowTargets(empty, empty, empty.astype(np.float32)) for _ in rows)
                continue
            at_loss = logits.reshape(-1, logits.shape[-1])[mx.array(flat)]  # (P, V)
            lp = tempered_logprobs(at_loss, temperature)
            splits = np.cumsum([len(p) for p in pos])[:-1]
            if targets == "topk":
                ids, vals = topk_targets(lp, k)
                for i, v in zip(np.split(ids, splits), np.split(vals, splits)):
                    counts = np.full(len(i), i.shape[1], dtype=np.int32)
                    out.append(RowTargets(counts, i.reshape(-1), v.reshape(-1)))
            else:
                lp_np = np.array(lp, dtype=np.float32)
                for r, part in enumerate(np.split(lp_np, splits)):
                    rng = np.random.default_rng([seed, row_ids[c0 + r]])
                    counts, ids, draws = sample_targets(part, samples, rng)
                    logw = np.log(draws / samples).astype(np.float32)
                    out.append(RowTargets(counts, ids, logw))
        return out

    def generate(
        self,
        prompts: list[str],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        chat: bool = True,
        batch_size: int = 32,
    ) -> list[Completion]:
        """Answer prompts in batches (sequence-level KD). temperature 0 is greedy decoding.

        chat: wrap each prompt in the tokenizer's chat template when it has one.
        Batched with mlx-lm's continuous batching; the RNG is seeded once, so the same prompts,
        seed and batch_size give the same answers. finish_reason is "stop" when the model ended
        the answer, "length" when it hit max_tokens.
        """
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        tokenizer = self.tokenizer
        if not isinstance(tokenizer, TokenizerWrapper):
            tokenizer = TokenizerWrapper(tokenizer)
        has_template = chat and getattr(tokenizer, "chat_template", None)
        encoded = []
        for prompt in prompts:
            if has_template:
                messages = [{"role": "user", "content": prompt}]
                encoded.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            else:
                encoded.append(tokenizer.encode(prompt))
        answers = self.generate_ids(
            encoded,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            batch_size=batch_size,
        )
        results = []
        for prompt, ids, (text, tokens, reason) in zip(prompts, encoded, answers):
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(tokens)}
            results.append(Completion(prompt, text, finish_reason=reason, usage=usage))
        return results

    def generate_ids(
        self,
        prompts: list[list[int]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        batch_size: int = 32,
    ) -> list[tuple[str, list[int], str]]:
        """(text, answer ids, finish_reason) for each tokenized prompt, decoded in batches with
        mlx-lm's continuous batching; the RNG is seeded once, so the same prompts, seed and
        batch_size give the same answers. finish_reason is "stop" when the model ended the
        answer (its end token is not returned), "length" when it hit max_tokens."""
        from mlx_lm import batch_generate
        from mlx_lm.sample_utils import make_sampler
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        tokenizer = self.tokenizer
        if not isinstance(tokenizer, TokenizerWrapper):
            tokenizer = TokenizerWrapper(tokenizer)
        mx.random.seed(seed)
        out = batch_generate(
            self.model,
            tokenizer,
            prompts,
            max_tokens=max_tokens,
            sampler=make_sampler(temp=temperature, top_p=top_p, top_k=top_k),
            return_token_ids=True,
            completion_batch_size=batch_size,
            prefill_batch_size=min(batch_size, 8),
        )
        return [
            (text, list(tokens), "length" if len(tokens) >= max_tokens else "stop")
            for tokens, text in zip(out.token_ids, out.texts)
        ]

    def answer_logprobs(
        self, sequences: Sequence[np.ndarray], starts: Sequence[int], *, k: int, temperature: float
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The teacher's view of answers it reads in its own tokens (teacher forcing).

        sequences: prompt + answer ids per row; starts: where each row's answer begins.
        Returns per row, over its answer tokens i (predicted at position start + i - 1):
        the log-prob of the token itself (n,), and the top-k candidates' ids and log-probs
        (n, k), at `temperature`."""
        T = max(len(s) for s in sequences)
        batch = np.zeros((len(sequences), T), dtype=np.int32)
        for r, seq in enumerate(sequences):
            batch[r, : len(seq)] = seq
        chunk = max(1, self.max_logits_bytes // (self.vocab_size * T * 4))
        out = []
        for c0 in range(0, len(sequences), chunk):
            logits = self._logits(mx.array(batch[c0 : c0 + chunk]))
            for r in range(logits.shape[0]):
                seq, start = sequences[c0 + r], starts[c0 + r]
                lp = tempered_logprobs(logits[r, start - 1 : len(seq) - 1], temperature)
                chosen = mx.take_along_axis(lp, mx.array(seq[start:])[:, None], axis=-1)[:, 0]
                ids, vals = topk_targets(lp, k)
                out.append((np.array(chosen, dtype=np.float32), ids, vals))
        return out


def _weights_hash(model: nn.Module) -> str:
    """sha256 of every parameter's name, dtype, shape and bytes: the teacher's version."""
    digest = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
        # the array's own buffer: no copy, so hashing a large teacher costs one pass over it
        digest.update(memoryview(mx.contiguous(value)).cast("B"))
    return digest.hexdigest()[:16]


def _fp32_on_cpu(teacher: LocalTeacher) -> None:
    """Score in float32 on the CPU backend: cast a bf16/fp16 teacher, and dequantize a quantized
    one whose float32 copy fits in half of the memory (quantized matmuls are slow there too)."""
    if backend.device() != "cpu":
        return
    model = teacher.model
    params = tree_flatten(model.parameters())
    quantized = any(k.endswith(".scales") for k, _ in params)
    if quantized:
        from mlx_lm.utils import dequantize_model

        # a quantized tensor of b bits holds 32 / b values per uint32 element
        bits = max((m.bits for _, m in model.named_modules() if hasattr(m, "bits")), default=4)
        values = sum(
            v.size * (32 // bits if v.dtype == mx.uint32 else 1)
            for k, v in params
            if not k.endswith((".scales", ".biases"))
        )
        if values * 4 > backend.memory_bytes() // 2:
            return
        model = dequantize_model(model)
        what = f"dequantized from {bits}-bit"
    else:
        low = {v.dtype for _, v in params if v.dtype in (mx.bfloat16, mx.float16)}
        if not low:
            return
        what = "cast from " + "/".join(sorted(str(d).split(".")[-1] for d in low))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    teacher.model = model
    print(
        f"teacher {teacher.id}: scoring in float32 on the CPU backend ({what}; "
        f"low-precision matmuls are much slower there)",
        file=sys.stderr,
    )
