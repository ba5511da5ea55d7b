"""Client-side throughput limits and retry policy for API teachers.

`Limiter` keeps a request bucket (requests per minute) and a token bucket (tokens per minute),
both refilled continuously with about one second of burst, plus a shared pause that a 429 with a
server retry delay sets for every worker (the quota is per project, so one 429 means all of us
should wait). The token bucket is debited by an estimate before a request and corrected by the
real `usageMetadata` afterwards, so it may go negative and then holds the next request back.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from typing import Any

RETRYABLE_CODES = (408, 429, 500, 502, 503, 504)


class _Bucket:
    def __init__(self, per_minute: float, clock: Callable[[], float]) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.clock = clock
        self.stamp = clock()

    def refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, need: float) -> float:
        """Seconds until the level reaches `need` (0 if it already has)."""
        self.refill()
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class Limiter:
    """rpm / tpm limits (0 = unlimited) and a shared pause, for asyncio workers."""

    def __init__(self, rpm: int, tpm: int, *, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.requests = _Bucket(rpm, clock) if rpm > 0 else None
        self.tokens = _Bucket(tpm, clock) if tpm > 0 else None
        self.pause_until = 0.0

    def delay(self) -> float:
        """Seconds the next request must still wait (0: it may go now)."""
        wait = max(0.0, self.pause_until - self.clock())
        if self.requests is not None:
            wait = max(wait, self.requests.wait_time(1.0))
        if self.tokens is not None:
            # Any positive level lets one request through; its estimate may push the level below 0.
            wait = max(wait, self.tokens.wait_time(min(1.0, self.tokens.capacity)))
        return wait

    async def acquire(self, est_tokens: int) -> None:
        """Wait for room for one request of about `est_tokens` tokens, then debit it."""
        while (wait := self.delay()) > 0:
            await asyncio.sleep(wait)
        if self.requests is not None:
            self.requests.level -= 1.0
        if self.tokens is not None:
            self.tokens.level -= est_tokens

    def settle(self, est_tokens: int, actual_tokens: int) -> None:
        """Correct the token bucket once the real usage is known."""
        if self.tokens is not None:
            self.tokens.level += est_tokens - actual_tokens

    def pause(self, seconds: float) -> None:
        """Hold every worker for `seconds` (a server-requested retry delay)."""
        self.pause_until = max(self.pause_until, self.clock() + seconds)


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    rng = rng or random
    return rng.uniform(0.0, min(cap, base * (2.0**attempt)))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)s\s*$")


def server_retry_delay(details: Any) -> float | None:
    """`google.rpc.RetryInfo.retryDelay` ("47s", "0.5s") from an error body, in seconds."""
    error = details.get("error", details) if isinstance(details, dict) else None
    items = error.get("details") if isinstance(error, dict) else None
    if not isinstance(items, list):
        return None
    for item in items:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(item.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None
