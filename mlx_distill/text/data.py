"""JSONL readers. One record per line, in one of three shapes:

- `{"prompt": ..., "completion": ...}` (extra fields such as `answer` are kept),
- `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` (the last assistant turn
  is the completion; earlier turns become the prompt),
- `{"text": ...}` (plain text: the whole sequence is trained).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_distill.errors import BadInput


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Records from a JSONL file, normalized to have `prompt` and `completion` keys."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"data file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path} line {lineno}: invalid JSON: {e.msg}") from None
            records.append(_normalize(raw, path, lineno))
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise BadInput(f"data file is empty: {path}")
    return records


def _normalize(raw: object, path: Path, lineno: int) -> dict:
    where = f"{path} line {lineno}"
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: expected a JSON object")
    if "prompt" in raw and "completion" in raw:
        if not isinstance(raw["prompt"], str) or not isinstance(raw["completion"], str):
            raise BadInput(f"{where}: prompt and completion must be strings")
        return dict(raw)
    if "messages" in raw:
        messages = raw["messages"]
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        )
        if not ok or not messages or messages[-1].get("role") != "assistant":
            raise BadInput(f"{where}: messages must be a list ending with an assistant turn")
        prompt = "\n".join(m["content"] for m in messages[:-1] if m.get("role") != "system")
        return dict(raw, prompt=prompt, completion=messages[-1]["content"])
    if "text" in raw:
        if not isinstance(raw["text"], str):
            raise BadInput(f"{where}: text must be a string")
        return dict(raw, prompt="", completion=raw["text"])
    raise BadInput(f"{where}: expected keys prompt+completion, messages, or text")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
