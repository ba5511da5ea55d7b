"""From a Gemini teacher's stored answers to token targets for the student.

Each answered prompt becomes one row in the student's tokens (its chat template, the thought
summary in the reasoning span, then the answer; `teachers/align.py`), with the teacher's
log-prob candidates aligned to the student positions they predict as sparse top-k targets. The
cache has the format a local teacher's has (`cache/writer.py`), so the distill stage trains on
both the same way: CE on the teacher's text plus KD where a position has targets; positions
without targets hold the label with probability 1 (see `cache/loader.py`), and the teacher mass
outside the stored candidates goes to the loss's tail bucket. The cache stage itself is
`stages/gemini.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlx_distill.cache.records import record_key
from mlx_distill.cache.sparse import RowTargets
from mlx_distill.recipe import GeminiConfig
from mlx_distill.teachers.gemini import teacher_identity
from mlx_distill.text.tokenizer import vocab_hash


def prompt_keys(cfg: GeminiConfig, prompts: list[dict]) -> list[str]:
    """Record keys of the training prompts (unique, in data order)."""
    identity = teacher_identity(cfg)
    model = identity["id"].split("/", 1)[1]
    keys = (record_key(model, identity["params"], p["prompt"]) for p in prompts)
    return list(dict.fromkeys(keys))


def target_k(cfg: GeminiConfig) -> int:
    """Slots per position: the top candidates asked for, plus the chosen token when absent."""
    return cfg.logprobs + 1


class AlignedTeacher:
    """The `teacher.score` that `build_token_cache` calls, over precomputed aligned targets.

    examples, targets: what `align.records_to_examples` returns. identity: `teacher_identity`.
    content: the digest of the stored answers they were made from (the teacher's version)."""

    def __init__(self, examples, targets, tokenizer, identity: dict, content: str | None) -> None:
        self.id = identity["id"]
        self.params = identity["params"]
        self.version = f"records:{content}"
        self.vocab_hash = vocab_hash(tokenizer)
        self.vocab_size = max(tokenizer.get_vocab().values()) + 1
        self.examples, self.targets = examples, targets

    def score(self, rows, *, row_ids, **_: Any) -> list[RowTargets]:
        return [row_targets(self.examples[i].mask, self.targets[i]) for i in row_ids]


def row_targets(mask: np.ndarray, targets: tuple[np.ndarray, np.ndarray] | None) -> RowTargets:
    """Ragged targets for the P positions t with mask[t + 1] from aligned (T, k) arrays.

    Positions the alignment did not cover get no entries (counts 0)."""
    positions = np.flatnonzero(mask[1:])
    if targets is None:
        empty = np.zeros(0, dtype=np.int32)
        return RowTargets(np.zeros(len(positions), np.int32), empty, empty.astype(np.float32))
    ids, lps = targets
    live = np.isfinite(lps[positions])
    return RowTargets(
        live.sum(axis=1).astype(np.int32),
        ids[positions][live].astype(np.int32),
        lps[positions][live].astype(np.float32),
    )


def report_line(result: dict[str, Any]) -> str:
    """The report's sentence on what the student learned from (prompts used, coverage)."""
    cov = result["coverage"]
    line = (
        f"Teacher data: {result['prompts_used']} of {result['prompts']} prompts used "
        f"({result['answered']} answered, {result['failed']} failed, "
        f"{result['unasked']} not asked"
        + ("; a partial teach, allowed by teacher.allow_partial" if result["partial"] else "")
        + f"; {cov['skipped']} answers left out as failed or cut off)."
    )
    if cov["with_logprobs"]:
        ids = "exact teacher ids" if cov["exact_ids"] else "token strings"
        line += (
            f" Token-level targets ({ids}) on {cov['covered_positions']} of {cov['positions']} "
            f"answer positions ({cov['position_fraction']:.1%}), covering "
            f"{cov['mass_fraction']:.1%} of the teacher's probability mass there."
        )
    else:
        line += " No log-probs: sequence-level KD on the teacher's text only."
    return line
