"""The recipe's `teacher.gemini` section: Gemini teacher options and their range checks (a part
of the typed recipe schema in `mlx_distill.recipe`, which re-exports both)."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_distill.errors import BadInput


@dataclass
class GeminiConfig:
    """Gemini teacher options (teacher.kind: gemini). The API key comes only from the env."""

    model: str = "gemini-2.5-flash"
    api_version: str = "v1beta"  # pinned: SDK 3.x defaults to v1, where some models 404
    base_url: str | None = None  # else GOOGLE_GEMINI_BASE_URL, else Google's endpoint
    system_instruction: str | None = None
    temperature: float = 1.0
    max_output_tokens: int = 8192  # includes thinking tokens
    thinking_budget: int | None = None  # Gemini 2.5: tokens, -1 dynamic, 0 off
    thinking_level: str | None = None  # Gemini 3: minimal | low | medium | high
    include_thoughts: bool = True  # thought summaries, stored apart from the answer
    logprobs: int = 0  # top candidates per token (0..20); 0: text only
    max_in_flight: int = 8
    rpm: int = 60  # requests per minute; 0: unlimited
    tpm: int = 0  # tokens per minute; 0: unlimited
    timeout_s: float = 300.0
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_cost: float | None = None  # USD; stop cleanly once the tally reaches it
    batch: bool = False  # Batch API: half price, results within 24 h
    poll_interval_s: float = 30.0


def validate_gemini(g: GeminiConfig) -> None:
    """Range checks for teacher.gemini; BadInput names the key."""
    if g.api_version not in ("v1", "v1beta"):
        raise BadInput(
            f"recipe key teacher.gemini.api_version: {g.api_version!r} is not v1 or v1beta"
        )
    if g.thinking_level is not None and g.thinking_level.lower() not in (
        "minimal",
        "low",
        "medium",
        "high",
    ):
        raise BadInput(
            f"recipe key teacher.gemini.thinking_level: {g.thinking_level!r} is not one of "
            "minimal, low, medium, high"
        )
    if not 0 <= g.logprobs <= 20:
        raise BadInput(f"recipe key teacher.gemini.logprobs: must be in 0..20, got {g.logprobs}")
    if not 0.0 <= g.temperature <= 2.0:
        raise BadInput(
            f"recipe key teacher.gemini.temperature: must be in [0, 2], got {g.temperature}"
        )
    checks = {
        "max_output_tokens": g.max_output_tokens > 0,
        "max_in_flight": g.max_in_flight > 0,
        "rpm": g.rpm >= 0,
        "tpm": g.tpm >= 0,
        "timeout_s": g.timeout_s > 0,
        "max_retries": g.max_retries >= 0,
        "backoff_base_s": g.backoff_base_s >= 0,
        "backoff_max_s": g.backoff_max_s >= g.backoff_base_s,
        "poll_interval_s": g.poll_interval_s > 0,
        "max_cost": g.max_cost is None or g.max_cost > 0,
    }
    for key, ok in checks.items():
        if not ok:
            value = getattr(g, key)
            raise BadInput(f"recipe key teacher.gemini.{key}: out of range, got {value}")
