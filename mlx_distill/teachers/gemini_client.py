"""One Gemini request done right: SDK client set-up, retries, response -> record.

The SDK's own retries are switched off (`HttpRetryOptions(attempts=1)`: tenacity stops after one
try, and a non-None `retry_options` also disables the SDK's implicit retry on connection errors),
so the policy here is the only one: exponential backoff with full jitter on 408/429/5xx,
connection errors, timeouts and malformed bodies, honouring `RetryInfo.retryDelay`, which the SDK
ignores. Everything else becomes a failed record with its reason, never an exception.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from mlx_distill.errors import BadInput
from mlx_distill.recipe import GeminiConfig
from mlx_distill.teachers.limits import RETRYABLE_CODES, Limiter, backoff, server_retry_delay
from mlx_distill.teachers.prices import cost_usd, model_price

KEY_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # the SDK's order: GOOGLE_API_KEY wins
_STOP_REASONS = ("STOP", "MAX_TOKENS")


def api_key() -> str:
    """The key from the environment (never from a file); BadInput saying how to set it."""
    for var in KEY_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return value
    raise BadInput(
        "no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) in the environment, "
        "e.g. `export GEMINI_API_KEY=...` with a key from https://aistudio.google.com/apikey"
    )


def redact(text: str) -> str:
    """`text` with any API key from the environment replaced, before it is stored or printed."""
    for var in KEY_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            text = text.replace(value, "[key]")
    return text


def make_client(cfg: GeminiConfig):
    """A `genai.Client` pinned to `cfg.api_version`, with our timeout and no SDK retries."""
    from google import genai
    from google.genai import types

    options = types.HttpOptions(
        api_version=cfg.api_version,
        timeout=int(cfg.timeout_s * 1000),  # the SDK takes milliseconds
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    if cfg.base_url:  # else the SDK reads GOOGLE_GEMINI_BASE_URL, else Google's endpoint
        options.base_url = cfg.base_url
    return genai.Client(api_key=api_key(), http_options=options)


def generation_params(cfg: GeminiConfig) -> dict[str, Any]:
    """The parameters that change an answer: part of every record key and of the teacher id."""
    return {
        "system_instruction": cfg.system_instruction,
        "temperature": cfg.temperature,
        "max_output_tokens": cfg.max_output_tokens,
        "thinking_budget": cfg.thinking_budget,
        "thinking_level": cfg.thinking_level,
        "include_thoughts": cfg.include_thoughts,
        "logprobs": cfg.logprobs,
    }


def request_config(cfg: GeminiConfig, *, logprobs: bool):
    """`types.GenerateContentConfig` for one request (log-probs only when still enabled)."""
    from google.genai import types

    thinking = None
    if cfg.include_thoughts or cfg.thinking_budget is not None or cfg.thinking_level:
        thinking = types.ThinkingConfig(
            include_thoughts=cfg.include_thoughts or None,
            thinking_budget=cfg.thinking_budget,
            thinking_level=cfg.thinking_level.upper() if cfg.thinking_level else None,
        )
    extra: dict[str, Any] = {}
    if logprobs and cfg.logprobs > 0:
        extra = {"response_logprobs": True, "logprobs": cfg.logprobs}
    return types.GenerateContentConfig(
        system_instruction=cfg.system_instruction,
        temperature=cfg.temperature,
        max_output_tokens=cfg.max_output_tokens,
        thinking_config=thinking,
        **extra,
    )


def _enum_name(value: Any) -> str:
    return str(getattr(value, "value", value) or "").upper()


def usage_of(response: Any) -> dict[str, int]:
    """Prompt, answer, thinking and total tokens from `usageMetadata` (0 where absent)."""
    meta = getattr(response, "usage_metadata", None)
    if meta is None:
        return {"prompt": 0, "answer": 0, "thoughts": 0, "total": 0}
    return {
        "prompt": meta.prompt_token_count or 0,
        "answer": meta.candidates_token_count or 0,
        "thoughts": meta.thoughts_token_count or 0,
        "total": meta.total_token_count or 0,
    }


def parse_response(response: Any) -> dict[str, Any]:
    """Record fields from a `GenerateContentResponse`: status, text, thoughts, finish reason,
    usage, per-token candidates [[token, logprob, [[alt, logprob, alt_id], ...], token_id], ...]
    (ids are the teacher's `tokenId`s, None where the API leaves them out) and error."""
    out: dict[str, Any] = {
        "status": "ok",
        "text": "",
        "thoughts": "",
        "finish_reason": "",
        "usage": usage_of(response),
        "tokens": None,
        "error": None,
        "model_version": getattr(response, "model_version", None),
        "response_id": getattr(response, "response_id", None),
    }
    if not response.candidates:
        feedback = getattr(response, "prompt_feedback", None)
        reason = _enum_name(getattr(feedback, "block_reason", None)) or "no candidates"
        out.update(status="failed", finish_reason="blocked", error=f"prompt blocked: {reason}")
        return out
    cand = response.candidates[0]
    parts = (cand.content.parts if cand.content else None) or []
    out["thoughts"] = "".join(p.text for p in parts if p.text and p.thought)
    out["text"] = "".join(p.text for p in parts if p.text and not p.thought)
    finish = _enum_name(cand.finish_reason) or "STOP"
    out["finish_reason"] = finish.lower()
    if finish not in _STOP_REASONS:
        out.update(status="failed", error=f"finish reason {finish}")
    elif not out["text"]:
        why = (
            "MAX_TOKENS without an answer (thinking used the output cap: raise "
            "max_output_tokens or lower the thinking budget)"
            if finish == "MAX_TOKENS"
            else "empty answer"
        )
        out.update(status="failed", error=why)
    result = getattr(cand, "logprobs_result", None)
    if result is not None and result.chosen_candidates:
        tops = result.top_candidates or []
        tokens = []
        for i, chosen in enumerate(result.chosen_candidates):
            alts = tops[i].candidates if i < len(tops) and tops[i].candidates else []
            tokens.append(
                [
                    chosen.token or "",
                    float(chosen.log_probability or 0.0),
                    [[c.token or "", float(c.log_probability or 0.0), c.token_id] for c in alts],
                    chosen.token_id,
                ]
            )
        out["tokens"] = tokens
    return out


def run_wide_error(exc: Any, cfg: GeminiConfig) -> str | None:
    """A one-line fix-it message for errors that no prompt can get past (bad key, no access,
    unknown model): those stop the run (exit 2) instead of failing every prompt in turn."""
    text = json.dumps(getattr(exc, "details", None) or {}) + str(exc.message or "")
    where = f"model {cfg.model} on API {cfg.api_version}"
    if exc.code == 401 or "API_KEY_INVALID" in text:
        return "Gemini rejected the API key: check GEMINI_API_KEY (or GOOGLE_API_KEY)"
    if exc.code == 403:
        return redact(
            f"Gemini denied access to {where} (403 {exc.message}): check the key's project"
        )
    if exc.code == 404:
        return redact(
            f"Gemini does not know {where} (404 {exc.message}): check teacher.gemini.model "
            "and teacher.gemini.api_version (previews and -latest exist only on v1beta)"
        )
    return None


def _logprobs_refused(exc: Any) -> bool:
    return getattr(exc, "code", None) == 400 and "logprob" in str(exc.message or "").lower()


@dataclass
class RunState:
    """What the workers of one run share: limits, the log-probs downgrade, the running tally."""

    cfg: GeminiConfig
    limiter: Limiter
    logprobs: bool
    logprobs_note: str | None = None  # set once, on the first log-probs 400
    avg_out_tokens: float = 0.0
    answered: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    cost: float = 0.0
    price: dict[str, Any] | None = None
    batch: bool = False
    # Called once with the note on the first log-probs refusal, so the caller stores it durably
    # at once (a kill right after must not meet the 400 again).
    on_logprobs_refused: Any = None

    def __post_init__(self) -> None:
        self.price = model_price(self.cfg.model)
        self.avg_out_tokens = float(min(self.cfg.max_output_tokens, 1024))

    def refuse_logprobs(self, note: str) -> None:
        """The first log-probs 400 of the run: stop asking for them and report it once."""
        if self.logprobs:
            self.logprobs = False
            self.logprobs_note = note
            if self.on_logprobs_refused is not None:
                self.on_logprobs_refused(note)

    def estimate_tokens(self, prompt: str) -> int:
        system = self.cfg.system_instruction or ""
        return int((len(prompt) + len(system)) / 4 + self.avg_out_tokens)

    def account(self, usage: dict[str, int]) -> float:
        """Add one response's usage to the tally; its cost in USD."""
        for name, value in usage.items():
            self.tokens[name] = self.tokens.get(name, 0) + value
        cost = cost_usd(usage, self.price, batch=self.batch)
        self.cost += cost
        out = usage.get("answer", 0) + usage.get("thoughts", 0)
        if out:
            self.answered += 1
            self.avg_out_tokens += (out - self.avg_out_tokens) / self.answered
        return cost


async def ask(client: Any, state: RunState, prompt: str) -> dict[str, Any]:
    """One prompt with limits and retries; always returns record fields (status ok|failed)."""
    from google.genai import errors as genai_errors
    from pydantic import ValidationError

    cfg = state.cfg
    attempt = 0
    while True:
        est = state.estimate_tokens(prompt)
        await state.limiter.acquire(est)
        use_logprobs = state.logprobs
        reason = None
        delay = None
        started = time.monotonic()
        try:
            response = await asyncio.wait_for(
                client.aio.models.generate_content(
                    model=cfg.model,
                    contents=prompt,
                    config=request_config(cfg, logprobs=use_logprobs),
                ),
                timeout=cfg.timeout_s + 1.0,  # a hard cap over the transport's per-phase timeout
            )
        except genai_errors.APIError as exc:
            state.limiter.settle(est, 0)
            if use_logprobs and _logprobs_refused(exc):
                state.refuse_logprobs(redact(f"{exc.code} {exc.message}"))
                continue  # the same request without log-probs; not a failed attempt
            message = redact(f"{exc.code} {exc.status or ''}: {exc.message or ''}".strip())
            fatal = run_wide_error(exc, cfg)
            if fatal:
                raise BadInput(fatal) from None
            if exc.code not in RETRYABLE_CODES:
                return {**failed_fields(message), "attempts": attempt + 1}
            reason = message
            delay = server_retry_delay(exc.details)
            if exc.code == 429 and delay is not None:
                state.limiter.pause(delay)
        except (
            TimeoutError,
            json.JSONDecodeError,
            ValidationError,
            genai_errors.UnknownApiResponseError,
        ) as exc:
            # A hung request or a malformed body: transient, like a 5xx.
            state.limiter.settle(est, 0)
            reason = redact(f"{type(exc).__name__} after {time.monotonic() - started:.1f}s")
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            state.limiter.settle(est, 0)
            reason = redact(f"{type(exc).__name__}: {exc}")
        else:
            fields = parse_response(response)
            state.limiter.settle(est, fields["usage"]["total"])
            fields["cost_usd"] = state.account(fields["usage"])
            fields["attempts"] = attempt + 1
            fields["logprobs"] = cfg.logprobs if use_logprobs else 0
            return fields
        attempt += 1
        if attempt > cfg.max_retries:
            return {
                **failed_fields(f"{reason} (gave up after {attempt} attempts)"),
                "attempts": attempt,
            }
        if delay is not None:  # the server said when: honour it, plus a little jitter
            wait = delay * random.uniform(1.0, 1.1)
        else:
            wait = backoff(attempt - 1, cfg.backoff_base_s, cfg.backoff_max_s)
        await asyncio.sleep(wait)


def failed_fields(reason: str) -> dict[str, Any]:
    return {
        "status": "failed",
        "text": "",
        "thoughts": "",
        "finish_reason": "error",
        "usage": {"prompt": 0, "answer": 0, "thoughts": 0, "total": 0},
        "cost_usd": 0.0,
        "tokens": None,
        "error": reason,
    }


def is_transport_error(exc: BaseException) -> bool:
    """Connection refused/reset/dropped, read timeouts: httpx2 or httpx transport errors."""
    for module in ("httpx2", "httpx"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        if isinstance(exc, mod.TransportError):
            return True
    return isinstance(exc, ConnectionError)


def make_record(key: str, item: dict[str, Any], fields: dict[str, Any], source: str) -> dict:
    """A store row: the prompt (and its id / reference answer) plus the response fields."""
    record = {"key": key, "id": item.get("id"), "prompt": item["prompt"]}
    if item.get("answer") is not None:
        record["reference"] = item["answer"]
    record.update(fields)
    record["source"] = source
    record["time"] = round(time.time(), 3)
    return record
