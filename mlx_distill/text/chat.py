"""The one encoder: every record (prompt/completion, messages, text) to tokens and a loss mask.

Conversations are rendered by the tokenizer's own chat template with every turn and role kept.
Trained spans are the assistant turns (`train_on="assistant"`) or the last one (`"last"`); each
runs from the first character of the turn's content to the end of the template's end-of-turn
token, which is found by rendering a probe conversation (the first special token after the
assistant's content), never assumed. The sequence ends at the last trained turn's end-of-turn
token.

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
content followed by a blank line, assistant content followed by the EOS token (trained).
A `text` record is [BOS] text EOS, all of it trained.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlx_distill.errors import BadInput
from mlx_distill.text.examples import TokenizedExample

ROLES = ("system", "user", "assistant")
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


def render(tokenizer, messages: list[dict], *, generation_prompt: bool, where: str = "") -> str:
    """The chat template's text for `messages`; a template error is a BadInput naming `where`."""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:
        message = getattr(e, "message", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise BadInput(
            f"{where or 'record'}: the tokenizer's chat template cannot render it: {message}"
        ) from None


def generation_prompt(tokenizer, messages: list[dict], where: str = "") -> str:
    """The text a model continues to answer `messages` (template, or the plain format)."""
    if has_template(tokenizer):
        return render(tokenizer, messages, generation_prompt=True, where=where)
    return _plain(tokenizer, messages, end_of_turn(tokenizer)[0])


def _plain(tokenizer, messages: list[dict], end_text: str) -> str:
    """[BOS], then system/user content + blank line, assistant content + EOS, per turn."""
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


class ChatEncoder:
    """Encodes records for one tokenizer. `cut` counts rows longer than `max_len` (truncated).

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
        self.cut = 0

    # -- text ----------------------------------------------------------------------------

    def _render(self, messages: list[dict], generation_prompt: bool, where: str) -> str:
        if self.template:
            return render(
                self.tokenizer, messages, generation_prompt=generation_prompt, where=where
            )
        return _plain(self.tokenizer, messages, self.end_text)  # prompt: the text before the answer

    def spans(self, record: dict) -> tuple[str, list[tuple[int, int]]]:
        """(text, trained character spans [start, end)) of a record; text ends at the last span."""
        where = _where(record)
        if record_shape(record) == "text":
            bos = getattr(self.tokenizer, "bos_token", None) or ""
            eos = getattr(self.tokenizer, "eos_token", None)
            if eos is None:
                raise BadInput(f"{where}: a text record needs a tokenizer with an EOS token")
            text = bos + record["text"] + eos
            return text, [(len(bos), len(text))]
        messages = record_messages(record)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        last = turns[-1]
        full = self._render(messages[: last + 1], False, where)
        trained = turns if self.train_on == "assistant" else [last]
        spans = []
        for i in trained:
            if i < last:  # the history must render the same inside the whole conversation
                history = self._render(messages[: i + 1], False, where)
                history = history[: history.rfind(self.end_text) + len(self.end_text)]
                if not full.startswith(history):
                    raise BadInput(
                        f"{where}: the chat template renders earlier turns differently in a "
                        "longer conversation; set data.train_on: last"
                    )
            head = self._render(messages[:i], True, where) if i else ""
            start = _common_prefix(head, full)
            end = full.find(self.end_text, max(start, spans[-1][1] if spans else 0))
            if end < 0:
                raise BadInput(
                    f"{where}: the chat template dropped the end-of-turn token "
                    f"{self.end_text!r} after assistant turn {i + 1}"
                )
            spans.append((start, end + len(self.end_text)))
        return full[: spans[-1][1]], spans

    # -- tokens --------------------------------------------------------------------------

    def encode(self, record: dict) -> TokenizedExample:
        """tokens (T,) int32 and mask (T,) bool (True on trained spans) for one record."""
        text, spans = self.spans(record)
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
        mask = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            mask[count[start] : count[end]] = True
        if len(ids) > self.max_len:
            self.cut += 1
            ids, mask = ids[: self.max_len], mask[: self.max_len]
        source = {"prompt": record.get("prompt", "")}
        return TokenizedExample(tokens=np.array(ids, np.int32), mask=mask, text=source)


def encode_records(
    tokenizer, records: list[dict], *, max_len: int, train_on: str = "assistant", what: str = ""
) -> tuple[list[TokenizedExample], int]:
    """(examples, rows cut at max_len); a cut is reported in one line on stderr."""
    import sys

    encoder = ChatEncoder(tokenizer, max_len=max_len, train_on=train_on)
    examples = [encoder.encode(r) for r in records]
    if encoder.cut:
        print(
            f"warning: {encoder.cut} of {len(records)} rows of {what or 'the data'} are longer "
            f"than data.max_seq_len ({max_len - 1}) allows and were cut to {max_len} tokens",
            file=sys.stderr,
        )
    return examples, encoder.cut


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
    return generation_prompt(tokenizer, messages[:last], _where(record))


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


def record_messages(record: dict) -> list[dict]:
    """The conversation of a prompt/completion or messages record."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    return [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["completion"]},
    ]
