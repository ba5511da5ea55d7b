"""The Teacher interface shared by the local and the Gemini teacher.

`generate(prompts)` gives sequence-level outputs (answer text, thought summary, usage, optional
per-token candidates); `score(batches)` (local teachers only) gives token-level targets for
sequences that are already tokenized with the student's tokenizer.

`TeacherKind` is what the recipe's stages ask of a kind of teacher (`teacher.kind`): what its
stage fingerprint hashes, the teacher stage, the cache stage and what the cache must match.
The stage functions in `pipeline.py` only call these methods, so a new kind (an OpenAI-compatible
server, say) is one new module with one class, named in `KINDS` below.
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


class TeacherKind(Protocol):
    """The stages' view of one teacher kind. Every method is a classmethod taking the stage
    `Context` (mlx_distill.context); each returns the JSON-able summary for `stage.json`.

    `data_parallel`: in a distributed group, True when every rank runs `teach` and
    `build_cache` on its share (they split the work and rank 0 writes the shared files); False
    when rank 0 runs them alone (an API teacher: one client, one record store)."""

    data_parallel: bool

    @classmethod
    def fingerprint_parts(cls, recipe: Any) -> tuple[dict[str, Any], dict[str, str]]:
        """(the recipe's `teacher` section as the teacher stage fingerprint sees it, digests of
        the files it reads). Only what changes the teacher's output belongs here: operational
        settings (cost caps, rate limits, timeouts, endpoints) must not invalidate a stage."""
        ...

    @classmethod
    def teach(cls, ctx: Any) -> dict[str, Any]:
        """The teacher stage. A result with "complete": False (a partial teach the recipe
        allows) is resumed by the next run; "failed_prompts" > 0 is rerun by --retry-failed;
        "content" (a digest of what it produced) reruns downstream stages when it changes."""
        ...

    @classmethod
    def build_cache(cls, ctx: Any) -> dict[str, Any]:
        """The cache stage: a token cache at ctx.stage_dir("cache") for the distill stage."""
        ...

    @classmethod
    def cache_expect(cls, ctx: Any, tokenizer: Any) -> dict[str, Any]:
        """Fingerprint fields the distill stage requires of the cache (`open_cache(expect=)`)."""
        ...


KINDS = {
    "local": ("mlx_distill.teachers.local", "LocalTeacher"),
    "gemini": ("mlx_distill.teachers.gemini", "GeminiTeacher"),
}


def teacher_kind(kind: str) -> type[TeacherKind]:
    """The class behind `teacher.kind` (imported on first use: mlx and google-genai are heavy)."""
    import importlib

    module, name = KINDS[kind]
    return getattr(importlib.import_module(module), name)
