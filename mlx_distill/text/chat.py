"""The one encoder: every record (prompt/completion, messages, text) to training rows: tokens and
a loss mask.

Conversations are rendered by the tokenizer's own chat template with every turn and role kept,
and with the record's `tools`, `tool_calls`, `tool` turns and `reasoning_content` handed to the
template as mlx-lm hands them (`apply_chat_template(messages, tools=...)`). Trained spans are the
assistant turns (`train_on="assistant"`) or the last one (`"last"`); each runs from the first
character of the turn's content to the end of the template's end-of-turn token, which is found by
rendering a probe conversation (the first special token after the assistant's content), never
assumed. A row ends at its last trained turn's end-of-turn token.

A conversation is one row when the template renders each earlier trained turn inside the whole
conversation as it renders it as the final turn. A template that rewrites history (Qwen3's keeps
`<think>` blocks only after the last user turn and inserts an empty one in the final turn) would
train earlier turns in a form the model never produces; such a conversation becomes one row per
assistant turn instead: the conversation up to that turn, rendered as the template renders it
when the model answers there (the history as the template shows it, the generation prompt, the
turn as a final turn), that turn trained. No turn and no reasoning trace is lost.

Spans come from rendering prefix by prefix: a turn starts where the conversation rendered up to
it with the generation prompt stops agreeing with the whole rendering (for a template whose
generation prompt adds text the history does not have, such as an empty thought channel, the
turn starts where the two part). The whole text is tokenized at once; every span boundary is then
checked to be a token boundary (the boundary's prefix tokenizes to a token prefix of the whole).
Where one is not (a pre-tokenizer merges text across the seam, e.g. an answer that starts with a
newline right after a header's newline), the text is tokenized segment by segment at the
boundaries instead, so the mask stays exact and the prompt side is tokenized as generation will
see it; the tokens still decode to the same text.

A tokenizer without a chat template gets the plain format: [BOS] then, per turn, system and user
content followed by a blank line, assistant content followed by the EOS token (trained); tool
use needs a template. A `text` record is [BOS] text EOS, all of it trained.

Rows longer than `max_len` tokens are cut there; a cut row that keeps no trained token is
dropped. `encode_records` counts records, rows, trained turns, split conversations, cut and
dropped rows (`Counts`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_distill.errors import BadInput
from mlx_distill.text.examples import TokenizedExample

_PROBE = "Zq7 probe answer"
# Reasoning spans some tokenizers carry as special tokens; the first one a tokenizer has wins.
# (open, close) and the special tokens that must exist for it.
KNOWN_REASONING = (
    (("<think>", "</think>"), ("<think>", "</think>")),
    (("<|channel>thought\n", "<channel|>"), ("<|channel>", "<channel|>")),
)
DEFAULT_REASONING = ("<think>", "</think>")


def _where(record: Any) -> str:
    return getattr(record, "source", None) or "record"


def _special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special and added tokens (markers, not text)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    ids = set(getattr(hf, "all_special_ids", []) or [])
    added = getattr(hf, "get_added_vocab", None)
    if added is not None:
        ids |= set(added().values())
    return ids


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(
    tokenizer,
    messages: list[dict],
    *,
    generation_prompt: bool,
    where: str = "",
    tools: list | None = None,
) -> str:
    """The chat template's text for `messages` (and the record's `tools`, as mlx-lm passes them);
    a template error is a BadInput naming `where`."""
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:
        message = getattr(e, "message", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise BadInput(
            f"{where or 'record'}: the tokenizer's chat template cannot render it: {message}"
        ) from None


def generation_prompt(
    tokenizer, messages: list[dict], where: str = "", tools: list | None = None
) -> str:
    """The text a model continues to answer `messages` (template, or the plain format)."""
    if has_template(tokenizer):
        return render(tokenizer, messages, generation_prompt=True, where=where, tools=tools)
    return _plain(tokenizer, messages, end_of_turn(tokenizer)[0], where, tools)


def _plain(
    tokenizer, messages: list[dict], end_text: str, where: str = "", tools: list | None = None
) -> str:
    """[BOS], then system/user content + blank line, assistant content + EOS, per turn."""
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise BadInput(
            f"{where or 'record'}: tools and tool calls need a tokenizer with a chat template "
            "(this one has none)"
        )
    parts = [getattr(tokenizer, "bos_token", None) or ""]
    for m in messages:
        parts.append(m["content"] + (end_text if m["role"] == "assistant" else "\n\n"))
    return "".join(parts)


def end_of_turn(tokenizer) -> tuple[str, int]:
    """(text, id) of the token that ends an assistant turn.

    With a chat template: the first token after the assistant's content in a rendered probe
    conversation, which must be a special token. Without one: the EOS token.
    """
    if not has_template(tokenizer):
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None:
            raise BadInput("the tokenizer has neither a chat template nor an EOS token")
        return eos, int(tokenizer.eos_token_id)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    full = render(tokenizer, probe, generation_prompt=False, where="the end-of-turn probe")
    at = full.rfind(_PROBE)
    rest = full[at + len(_PROBE) :] if at >= 0 else ""
    ids = tokenizer.encode(rest, add_special_tokens=False) if rest else []
    if not ids or ids[0] not in _special_ids(tokenizer):
        raise BadInput(
            "the tokenizer's chat template does not end an assistant turn with a special token "
            f"(after the answer it renders {rest[:40]!r}); training needs an end-of-turn token"
        )
    return tokenizer.convert_ids_to_tokens(ids[0]), int(ids[0])


def reasoning_span(tokenizer, open_: str | None = None, close: str | None = None):
    """(open, close) text of the reasoning span: the recipe's, else the tokenizer's own special
    tokens (`<think>`/`</think>`, Gemma 4's thought channel), else `<think>`/`</think>` as text."""
    if open_ is not None and close is not None:
        return open_, close
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    added = set(hf.get_added_vocab()) if hasattr(hf, "get_added_vocab") else set()
    for pair, tokens in KNOWN_REASONING:
        if all(t in added for t in tokens):
            return pair
    return DEFAULT_REASONING


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Counts:
    """What encoding a split gave: records read, rows kept, assistant turns trained in them,
    conversations split per turn, rows cut at max_len (kept), rows dropped (no trained token
    left after the cut)."""

    records: int = 0
    rows: int = 0
    turns: int = 0
    split: int = 0
    cut: int = 0
    dropped: int = 0

    def summary(self) -> dict:
        """The stage summary's entries (stage.json)."""
        return {
            "records": self.records,
            "rows": self.rows,
            "turns_trained": self.turns,
            "split_per_turn": self.split,
            "rows_cut": self.cut,
            "rows_dropped": self.dropped,
        }

    def line(self, what: str, max_seq_len: int) -> str:
        """One line for the console: rows and trained turns, and why rows differ from records."""
        text = (
            f"{what}: {_n(self.records, 'record')} -> {_n(self.rows, 'row')}, "
            f"{_n(self.turns, 'assistant turn')} trained"
        )
        if self.split:
            text += (
                f" ({_n(self.split, 'conversation')} split per turn: the chat template renders "
                "earlier turns differently)"
            )
        if self.cut:
            text += f"; {_n(self.cut, 'row')} cut to data.max_seq_len ({max_seq_len} tokens)"
        if self.dropped:
            text += (
                f"; {_n(self.dropped, 'row')} dropped: nothing trained within data.max_seq_len "
                f"({max_seq_len})"
            )
        return text


def _tool_names(items: list) -> list[str]:
    """Function names of tool schemas or tool calls (each the function, or {"function": ...})."""
    return [item.get("function", item)["name"] for item in items]


def _n(count: int, thing: str) -> str:
    return f"{count} {thing}" + ("" if count == 1 else "s")


class ChatEncoder:
    """Encodes records for one tokenizer, counting what it does in `counts` (`Counts`).

    max_len: the most tokens a row keeps (the loader's seq_len + 1: inputs and shifted labels).
    train_on: "assistant" trains every assistant turn, "last" only the final one.
    """

    def __init__(self, tokenizer, *, max_len: int, train_on: str = "assistant"):
        if train_on not in ("assistant", "last"):
            raise BadInput(f"train_on must be 'assistant' or 'last', not {train_on!r}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.train_on = train_on
        self.template = has_template(tokenizer)
        self.end_text, self.end_id = end_of_turn(tokenizer)
        self.counts = Counts()

    # -- text ----------------------------------------------------------------------------

    def _render(self, messages: list[dict], generation_prompt: bool, where: str, tools) -> str:
        if self.template:
            return render(
                self.tokenizer,
                messages,
                generation_prompt=generation_prompt,
                where=where,
                tools=tools,
            )
        # the plain format; as a prompt: the text before the answer
        return _plain(self.tokenizer, messages, self.end_text, where, tools)

    def rows(self, record: dict) -> list[tuple[str, list[tuple[int, int]]]]:
        """(text, trained character spans [start, end)) of each training row of a record: one
        row, unless the template renders an earlier trained turn differently inside the whole
        conversation (then one row per trained turn). Each text ends at its last span."""
        where = _where(record)
        if record_shape(record) == "text":
            bos = getattr(self.tokenizer, "bos_token", None) or ""
            eos = getattr(self.tokenizer, "eos_token", None)
            if eos is None:
                raise BadInput(f"{where}: a text record needs a tokenizer with an EOS token")
            text = bos + record["text"] + eos
            return [(text, [(len(bos), len(text))])]
        messages, tools = record_messages(record), record_tools(record)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        last = turns[-1]
        full = self._render(messages[: last + 1], False, where, tools)
        missing = [name for name in _tool_names(tools or []) if name not in full]
        if missing:  # the student would be trained to call tools it was never shown
            raise BadInput(
                f"{where}: the chat template does not render the record's tools ({missing[0]!r} "
                "is missing from its text); use a template that renders tools"
            )
        for n, m in enumerate(messages[:last], 1):
            if m["role"] == "tool" and m["content"].strip() not in full:
                raise BadInput(
                    f"{where}: the chat template does not render tool turns (message {n}); use "
                    "a template that renders them"
                )
        trained = turns if self.train_on == "assistant" else [last]
        earlier = [i for i in trained if i < last]
        if all(self._renders_alike(messages, i, full, where, tools) for i in earlier):
            return [self._row(messages, trained, full, where, tools)]
        return [
            self._row(
                messages, [i], self._render(messages[: i + 1], False, where, tools), where, tools
            )
            for i in trained
        ]

    def _renders_alike(self, messages, i: int, full: str, where: str, tools) -> bool:
        """Whether turn `i`, rendered as the final turn, is how `full` renders it."""
        history = self._render(messages[: i + 1], False, where, tools)
        at = history.rfind(self.end_text)
        return at >= 0 and full.startswith(history[: at + len(self.end_text)])

    def _row(self, messages, trained: list[int], full: str, where: str, tools):
        """(text, spans) of `full` with the assistant turns `trained` trained: each from where the
        generation prompt before it stops agreeing with `full` to its end-of-turn token."""
        spans: list[tuple[int, int]] = []
        for i in trained:
            head = self._render(messages[:i], True, where, tools) if i else ""
            start = _common_prefix(head, full)
            end = full.find(self.end_text, max(start, spans[-1][1] if spans else 0))
            if end < 0:
                raise BadInput(
                    f"{where}: the chat template dropped the end-of-turn token "
                    f"{self.end_text!r} after assistant turn {i + 1}"
                )
            calls = _tool_names(messages[i].get("tool_calls") or [])
            if any(name not in full[start:end] for name in calls):
                raise BadInput(
                    f"{where}: the chat template does not render the tool calls of assistant "
                    f"turn {i + 1} ({calls[0]!r}); use a template that renders tool calls"
                )
            thought = (messages[i].get("reasoning_content") or "").strip()
            if thought and thought not in full[start:end]:
                raise BadInput(
                    f"{where}: the chat template does not render the reasoning_content of "
                    f"assistant turn {i + 1}; put the reasoning in content or use a template "
                    "that renders it"
                )
            spans.append((start, end + len(self.end_text)))
        return full[: spans[-1][1]], spans

    # -- tokens --------------------------------------------------------------------------

    def encode(self, record: dict) -> list[TokenizedExample]:
        """The record's training rows: tokens (T,) int32 and mask (T,) bool (True on trained
        spans), cut at max_len; a row left with no trained token is dropped (and counted)."""
        rows = self.rows(record)
        counts = self.counts
        counts.records += 1
        counts.split += len(rows) > 1
        out = []
        for n, (text, spans) in enumerate(rows, 1):
            ids, bounds = self._tokens(text, spans)
            mask = np.zeros(len(ids), dtype=bool)
            for a, b in bounds:
                mask[a:b] = True
            if len(ids) > self.max_len:
                ids, mask = ids[: self.max_len], mask[: self.max_len]
                if not mask[1:].any():  # position 0 is never a target
                    counts.dropped += 1
                    continue
                counts.cut += 1
            counts.rows += 1
            counts.turns += sum(a < len(ids) for a, _ in bounds)
            source = {"prompt": record.get("prompt", "")}
            if len(rows) > 1:
                source["turn"] = n  # which assistant turn this row trains
            out.append(TokenizedExample(tokens=np.array(ids, np.int32), mask=mask, text=source))
        return out

    def _tokens(self, text: str, spans: list[tuple[int, int]]):
        """(ids, token spans) of `text`: tokenized whole, or at the span boundaries where one is
        not a token boundary of the whole."""
        encode = self.tokenizer.encode
        ids = encode(text, add_special_tokens=False)
        bounds = sorted({b for span in spans for b in span} - {0, len(text)})
        count = {0: 0, len(text): len(ids)}
        for b in bounds:
            head = encode(text[:b], add_special_tokens=False)
            if ids[: len(head)] != head:
                ids, count = _segments(encode, text, bounds)
                break
            count[b] = len(head)
        return ids, [(count[a], count[b]) for a, b in spans]


def encode_records(
    tokenizer, records: list[dict], *, max_len: int, train_on: str = "assistant", what: str = ""
) -> tuple[list[TokenizedExample], Counts]:
    """(rows of every record, in record order; `Counts`). Where a conversation was split per
    turn or a row cut or dropped, one line on stderr says so; BadInput if no row is left."""
    encoder = ChatEncoder(tokenizer, max_len=max_len, train_on=train_on)
    examples = [row for r in records for row in encoder.encode(r)]
    counts = encoder.counts
    what = what or "the data"
    if not examples:
        raise BadInput(
            f"{what}: no row keeps a trained token within data.max_seq_len ({max_len - 1}); "
            "raise data.max_seq_len"
        )
    if counts.split or counts.cut or counts.dropped:
        print(f"note: {counts.line(what, max_len - 1)}", file=sys.stderr)
    return examples, counts


def _segments(encode, text: str, bounds: list[int]) -> tuple[list[int], dict[int, int]]:
    """Tokens of `text` cut at `bounds`, each segment tokenized alone; token count per bound."""
    ids: list[int] = []
    count = {0: 0}
    cuts = [0, *bounds, len(text)]
    for a, b in zip(cuts, cuts[1:]):
        ids += encode(text[a:b], add_special_tokens=False)
        count[b] = len(ids)
    return ids, count


def record_prompt(tokenizer, record: dict) -> str:
    """The conversation before the record's last assistant turn, ready for generation."""
    messages = record_messages(record)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return generation_prompt(tokenizer, messages[:last], _where(record), record_tools(record))


def record_shape(record: dict) -> str:
    """ "text" for plain-text records (all trained, no chat format), else "chat"."""
    shape = getattr(record, "shape", None)
    if shape is not None:
        return shape
    return (
        "text"
        if "text" in record and "messages" not in record and "completion" not in record
        else "chat"
    )


def record_tools(record: dict) -> list | None:
    """The record's tool schemas (`tools`), or None."""
    return record.get("tools") or None


def conversation_shape(record: dict) -> tuple:
    """What a template's checks can depend on: tools or not, and each turn's role and whether it
    calls tools. Records of one shape render alike (for the preflight's one render per shape)."""
    turns = tuple((m["role"], bool(m.get("tool_calls"))) for m in record_messages(record))
    return (bool(record_tools(record)), *turns)


def record_messages(record: dict) -> list[dict]:
    """The conversation of a prompt/completion or messages record: each message with all its
    keys (tool_calls, reasoning_content, ...), as mlx-lm hands them to the template."""
    if "messages" in record:
        return [dict(m) for m in record["messages"]]
    return [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["completion"]},
    ]
