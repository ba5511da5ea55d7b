"""The Teacher interface shared by the local and the Gemini teacher.

`generate(prompts)` gives sequence-level outputs (answer text, thought summary, usage, optional
per-token candidates); `score(batches)` (local teachers only) gives token-level targets for
sequences that are already tokenized with the student's tokenizer.

What the recipe's stages ask of a kind of teacher (`teacher.kind`) is `stages.kinds.TeacherKind`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class TokenCandidates:
    """One generated token and the teacher's top alternatives at that position."""

    token: str
    logprob: float
    candidates: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Completion:
    """One teacher answer to one prompt."""

    prompt: str
    text: str
    thoughts: str = ""
    finish_reason: str = "stop"
    usage: dict[str, int] = field(default_factory=dict)
    tokens: list[TokenCandidates] | None = None
    error: str | None = None  # set when the request failed; text is then empty

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Teacher(Protocol):
    """What every teacher offers. `id` and `params` go into the cache fingerprint."""

    id: str
    params: dict[str, Any]

    def generate(self, prompts: list[str]) -> list[Completion]: ...
