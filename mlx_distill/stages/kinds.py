"""What the stages ask of a kind of teacher (`teacher.kind`): `TeacherKind`, and the registry.

A kind answers what the teacher stage's fingerprint hashes, runs the teacher and cache stages
and says what the cache must match. The stage bodies only call these methods, so a new kind (an
OpenAI-compatible server, say) is one new module here with one class, named in `KINDS`.
"""

from __future__ import annotations

from typing import Any, Protocol


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
    "local": ("mlx_distill.stages.local", "LocalKind"),
    "gemini": ("mlx_distill.stages.gemini", "GeminiKind"),
}


def teacher_kind(kind: str) -> type[TeacherKind]:
    """The class behind `teacher.kind` (imported on first use: google-genai is heavy)."""
    import importlib

    module, name = KINDS[kind]
    return getattr(importlib.import_module(module), name)
