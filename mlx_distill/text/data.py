"""JSONL readers. One record per line, in one of three shapes:

- `{"prompt": ..., "completion": ...}` (extra fields such as `answer` are kept),
- `{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...]}` with
  at least one assistant turn (the whole conversation is kept and rendered by the chat template),
- `{"text": ...}` (plain text: the whole sequence is trained).

Tool use and reasoning in mlx-lm's (OpenAI's) format are kept and handed to the template as
mlx-lm hands them: a record's `tools` list (function schemas), assistant turns with `tool_calls`
(their `content` may then be empty or null) and `reasoning_content`, `tool` turns with the tool's
answer. Their shapes are checked here, one line per problem.

Every record also gets `prompt` and `completion` strings for code that needs one prompt (a
teacher's question, a report's sample): for messages, the turns before the last assistant turn
other than system ones, joined by newlines, and the last assistant turn. `record.source` names
the file and line, `record.shape` is "chat" or "text".

`read_split` reads a recipe's split: a JSONL file here, a dataset folder or Hub dataset id
through `text.datasets` (its rows checked as these lines are).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_distill.errors import BadInput
from mlx_distill.files import write_text_atomic

ROLES = ("system", "user", "assistant", "tool")


class Record(dict):
    """A JSONL record (a dict) that remembers where it came from."""

    source: str = "record"
    shape: str = "chat"


def read_jsonl(path: str | Path, limit: int | None = None) -> list[Record]:
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


def read_split(data, split: str, limit: int | None = None) -> list[Record]:
    """The records of data.<split> (`data`: recipe.DataConfig): a JSONL file, or a dataset
    folder or Hub dataset id read through `datasets` with data.dataset's split and columns."""
    path = getattr(data, split)
    if Path(path).is_file():
        return read_jsonl(path, limit)
    from mlx_distill import hub
    from mlx_distill.text.datasets import read_rows

    folder = hub.dataset_folder(f"data.{split}", path)
    if not Path(folder).is_dir():
        return read_jsonl(path, limit)  # names the missing file
    label, rows = read_rows(folder, data.dataset, split, limit)
    records = [_normalize(row, Path(label), n) for n, row in enumerate(rows, 1)]
    if not records:
        raise BadInput(f"recipe key data.{split}: no rows in {label}")
    return records


def _record(fields: dict, where: str, shape: str) -> Record:
    record = Record(fields)
    record.source, record.shape = where, shape
    return record


def _normalize(raw: object, path: Path, lineno: int) -> Record:
    where = f"{path} line {lineno}"
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: expected a JSON object")
    if "tools" in raw:
        _check_tools(raw["tools"], where)
    if "prompt" in raw and "completion" in raw:
        if not isinstance(raw["prompt"], str) or not isinstance(raw["completion"], str):
            raise BadInput(f"{where}: prompt and completion must be strings")
        return _record(raw, where, "chat")
    if "messages" in raw:
        messages = raw["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadInput(f"{where}: messages must be a non-empty list")
        messages = [_message(m, n, where) for n, m in enumerate(messages, 1)]
        raw = dict(raw, messages=messages)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        if last < 0:
            raise BadInput(f"{where}: messages have no assistant turn to train on")
        prompt = "\n".join(m["content"] for m in messages[:last] if m["role"] != "system")
        return _record(
            dict(raw, prompt=prompt, completion=messages[last]["content"]), where, "chat"
        )
    if "text" in raw:
        if not isinstance(raw["text"], str):
            raise BadInput(f"{where}: text must be a string")
        if "tools" in raw:
            raise BadInput(f"{where}: a text record has no turns to show tools to; use messages")
        return _record(dict(raw, prompt="", completion=raw["text"]), where, "text")
    raise BadInput(f"{where}: expected keys prompt+completion, messages, or text")


def _message(m: object, n: int, where: str) -> dict:
    """Message `n` checked; an assistant turn with tool calls and no content gets content ""."""
    at = f"{where}: message {n}"
    if not isinstance(m, dict):
        raise BadInput(f"{at} must be an object with role and content")
    role = m.get("role")
    if role not in ROLES:
        raise BadInput(f"{at} has role {role!r}; roles are " + ", ".join(ROLES))
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise BadInput(f"{at}: only assistant turns have tool_calls, not {role} turns")
        if not isinstance(calls, list) or not calls:
            raise BadInput(f"{at}: tool_calls must be a non-empty list")
        for k, call in enumerate(calls, 1):
            _check_call(call, f"{at} tool call {k}")
        if m.get("content") is None:
            m = dict(m, content="")  # OpenAI's null content beside tool calls
    if not isinstance(m.get("content"), str):
        raise BadInput(f"{at} needs a string content")
    if "reasoning_content" in m:
        if role != "assistant":
            raise BadInput(f"{at}: only assistant turns have reasoning_content")
        if not isinstance(m["reasoning_content"], str):
            raise BadInput(f"{at}: reasoning_content must be a string")
    for key in ("name", "tool_call_id"):
        if key in m and not isinstance(m[key], str):
            raise BadInput(f"{at}: {key} must be a string")
    return m


def _check_call(call: object, at: str) -> None:
    """A tool call: {"type": "function", "function": {"name", "arguments"}} or the inner dict."""
    if not isinstance(call, dict):
        raise BadInput(f"{at} must be an object with a function")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadInput(f"{at} needs a function name (a string)")
    if not isinstance(function.get("arguments"), (dict, str)):
        raise BadInput(f"{at}: arguments must be an object or a JSON string")


def _check_tools(tools: object, where: str) -> None:
    """A record's `tools`: a non-empty list of function schemas, each with a name."""
    if not isinstance(tools, list) or not tools:
        raise BadInput(f"{where}: tools must be a non-empty list of function schemas")
    for k, tool in enumerate(tools, 1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadInput(f"{where}: tool {k} must be a function schema with a name")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
