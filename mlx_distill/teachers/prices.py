"""The dated Gemini price table (`prices.json`) and the cost of one response's usage."""

from __future__ import annotations

import datetime as dt
import json
from functools import cache
from pathlib import Path
from typing import Any

PRICES_FILE = Path(__file__).with_name("prices.json")


@cache
def price_table() -> dict[str, Any]:
    return json.loads(PRICES_FILE.read_text())


def model_price(model: str, today: dt.date | None = None) -> dict[str, Any] | None:
    """Price entry for `model`: exact id, else the longest table id it starts with
    ("gemini-2.5-flash-preview-09-2025" -> "gemini-2.5-flash"); None when unknown."""
    name = model.removeprefix("models/")
    table = price_table()["models"]
    matches = [m for m in table if name == m or name.startswith(m + "-")]
    if not matches:
        return None
    entry = table[max(matches, key=len)]
    until = entry.get("until")
    if until and (today or dt.date.today()) > dt.date.fromisoformat(until):
        entry = {**entry, **entry["after"]}
    return entry


def cost_usd(usage: dict[str, int], price: dict[str, Any] | None, *, batch: bool = False) -> float:
    """USD for one response: prompt tokens at the input price, answer + thoughts at the output
    price (thinking is billed as output); half of that through the Batch API."""
    if price is None:
        return 0.0
    prompt = usage.get("prompt", 0)
    long = price.get("long")
    p_in, p_out = price["input"], price["output"]
    if long and prompt > long["above_prompt_tokens"]:
        p_in, p_out = long["input"], long["output"]
    out = usage.get("answer", 0) + usage.get("thoughts", 0)
    factor = price_table()["batch_factor"] if batch else 1.0
    return factor * (prompt * p_in + out * p_out) / 1e6
