"""From Gemini records to student training data, across tokenizers, by character offsets.

Sequence level: the student's chat template with the thought summary inside a reasoning span
before the answer; the loss mask covers the assistant's reply and its end-of-turn token.

Token level (records with log-probs): the teacher's tokens are laid on the answer text to get
their character offsets; the student's tokens come with theirs. Where a student token starts at
the same character as a teacher token (an aligned position), every teacher candidate whose
string is exactly one student token becomes a sparse target at the student position that
predicts that token. Everything else is left to the loss's tail bucket (1 - covered mass).

Exact ids. Gemini 2.x/3 tokenize with the Gemma 3 vocabulary, so for a student that shares it a
candidate's `tokenId` is the student's id. That is not assumed: `exact_ids` checks every
candidate's id against its token string in the student's vocabulary, and only when all agree are
the ids used as they are (then a candidate counts even where its string is not the first piece
with that text, e.g. a byte-fallback piece).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from mlx_distill.cache.records import read_records
from mlx_distill.errors import BadInput
from mlx_distill.text.examples import TokenizedExample


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level BPE's byte -> printable character map (the standard construction)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def _byte_piece(piece: str) -> str | None:
    """'<0x0A>' -> '\\n' for single-byte (ASCII) fallback pieces; None otherwise."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        value = int(piece[3:5], 16)
        return chr(value) if value < 0x80 else None
    return None


def _hf(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside an mlx-lm TokenizerWrapper (or the tokenizer itself)."""
    inner = getattr(tokenizer, "_tokenizer", None)  # an HF tokenizer's own is the Rust backend
    return inner if hasattr(inner, "apply_chat_template") else tokenizer


def _is_sentencepiece(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "id_to_piece") and hasattr(tokenizer, "get_piece_size")


def piece_strings(tokenizer: Any) -> list[str | None]:
    """The text each student id stands for (None: special, not a whole character, or a byte
    fallback piece whose character also has a regular piece, which the tokenizer would pick)."""
    return _without_shadowed_bytes(*_raw_piece_strings(tokenizer))


def _without_shadowed_bytes(strings: list[str | None], byte_ids: set[int]) -> list[str | None]:
    regular = {s for i, s in enumerate(strings) if s and i not in byte_ids}
    return [None if i in byte_ids and s in regular else s for i, s in enumerate(strings)]


def _raw_piece_strings(tokenizer: Any) -> tuple[list[str | None], set[int]]:
    byte_ids: set[int] = set()
    if _is_sentencepiece(tokenizer):
        out: list[str | None] = []
        for i in range(tokenizer.get_piece_size()):
            if tokenizer.is_control(i) or tokenizer.is_unknown(i):
                out.append(None)
            elif tokenizer.is_byte(i):
                byte_ids.add(i)
                out.append(_byte_piece(tokenizer.id_to_piece(i)))
            else:
                out.append(tokenizer.id_to_piece(i).replace("\u2581", " "))
        return out, byte_ids
    hf = _hf(tokenizer)
    if not getattr(hf, "is_fast", False):
        raise BadInput("token-level targets need a fast (tokenizer.json) Hugging Face tokenizer")
    decoder = json.loads(hf.backend_tokenizer.to_str()).get("decoder") or {}
    byte_level = "ByteLevel" in json.dumps(decoder)
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(hf.all_special_ids)
    pieces = hf.convert_ids_to_tokens(list(range(len(hf))))
    out = []
    for i, piece in enumerate(pieces):
        if piece is None or i in special:
            out.append(None)
        elif byte_level and all(c in inverse for c in piece):
            try:
                out.append(bytes(inverse[c] for c in piece).decode("utf-8"))
            except UnicodeDecodeError:
                out.append(None)  # part of a multi-byte character: no string of its own
        elif (text := _byte_piece(piece)) is not None:
            byte_ids.add(i)
            out.append(text)
        else:
            out.append(piece.replace("\u2581", " "))
    return out, byte_ids


def encode_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Student ids for `text` and each token's (start, end) character span in `text`."""
    if _is_sentencepiece(tokenizer):
        try:
            proto = tokenizer.encode(text, out_type="proto")
        except ValueError:  # sentencepiece < 0.2.1 names it "immutable_proto"
            proto = tokenizer.encode(text, out_type="immutable_proto")
        ids, spans, pos = [], [], 0
        for piece in proto.pieces:
            ids.append(piece.id)
            spans.append((pos, pos + len(piece.surface)))
            pos += len(piece.surface)
        return ids, spans
    enc = _hf(tokenizer)(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]


def _token_starts(answer: str, tokens: list) -> dict[int, int]:
    """Character offset in `answer` -> teacher step, for the prefix where the tokens spell it."""
    starts, pos = {}, 0
    for i, step in enumerate(tokens):
        token = step[0]
        if not token or not answer.startswith(token, pos):
            break  # the teacher's tokens stop spelling the answer: align no further
        starts[pos] = i
        pos += len(token)
    return starts


def align_targets(
    text: str,
    answer_start: int,
    answer: str,
    tokens: list,
    ids: list[int],
    spans: list[tuple[int, int]],
    strings: list[str | None],
    k: int,
    exact: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Sparse student targets from teacher candidates.

    text: the full student sequence; the answer is text[answer_start : answer_start+len(answer)].
    tokens: teacher steps [[token, logprob, [[candidate, logprob(, id)], ...](, id)], ...] over
    the answer. ids, spans: the student tokenization of `text` with character spans; strings:
    piece_strings. exact: candidate ids are student ids (checked by `exact_ids`).
    Returns ids (T, k) int32, logprobs (T, k) float32 (row t predicts ids[t+1]; empty slots
    have id 0 and -inf) and {"positions", "covered", "mass"} over the answer's student tokens.
    """
    T = len(ids)
    out_ids = np.zeros((T, k), dtype=np.int32)
    out_lps = np.full((T, k), -np.inf, dtype=np.float32)
    lookup: dict[str, int] = {}
    for sid, s in enumerate(strings):
        if s:
            lookup.setdefault(s, sid)
    starts = _token_starts(answer, tokens)
    stats = {"positions": 0.0, "covered": 0.0, "mass": 0.0}
    end = answer_start + len(answer)
    for j in range(1, T):
        start, stop = spans[j]
        piece = strings[ids[j]] if ids[j] < len(strings) else None
        if piece and stop - len(piece) >= 0 and text[stop - len(piece) : stop] == piece:
            start = stop - len(piece)  # spans may leave out a leading space the piece includes
        if not answer_start <= start < end:
            continue
        stats["positions"] += 1
        step = starts.get(start - answer_start)
        if step is None:
            continue
        token, logprob, alternatives = tokens[step][:3]
        chosen_id = tokens[step][3] if len(tokens[step]) > 3 else None
        merged: dict[int, float] = {}
        seen = {c[0] for c in alternatives}
        chosen = [[token, logprob, chosen_id]] if token not in seen else []
        for cand in list(alternatives) + chosen:
            lp = cand[1]
            cid = cand[2] if len(cand) > 2 else None
            sid = cid if exact and cid is not None else lookup.get(cand[0])
            if sid is not None:  # the candidate is exactly one student token
                old = merged.get(sid)
                merged[sid] = lp if old is None else float(np.logaddexp(old, lp))
        if not merged:
            continue
        best = sorted(merged.items(), key=lambda kv: -kv[1])[:k]
        out_ids[j - 1, : len(best)] = [sid for sid, _ in best]
        out_lps[j - 1, : len(best)] = [lp for _, lp in best]
        stats["covered"] += 1
        stats["mass"] += min(1.0, sum(math.exp(lp) for _, lp in best))
    return out_ids, out_lps, stats


def _same_piece(token: str, piece: str | None) -> bool:
    return piece is not None and token.replace("\u2581", " ") == piece


def exact_ids(records: list[dict[str, Any]], strings: list[str | None]) -> dict[str, int]:
    """{"checked", "agree"}: candidates with a `tokenId` whose student piece spells the same
    text. The ids are the student's when checked > 0 and agree == checked."""
    checked = agree = 0
    for record in records:
        for step in record.get("tokens") or []:
            pairs = [(c[0], c[2]) for c in step[2] if len(c) > 2]
            if len(step) > 3:
                pairs.append((step[0], step[3]))
            for token, cid in pairs:
                if cid is None:
                    continue
                checked += 1
                agree += 0 <= cid < len(strings) and _same_piece(token, strings[cid])
    return {"checked": checked, "agree": agree}


def reply_mask(spans: list[tuple[int, int]], start: int, end: int) -> np.ndarray:
    """The trained tokens of a rendered conversation: those from character `start` (where the
    assistant's turn leaves the generation prompt) through the first token at or after `end`
    (the end-of-turn token after the reply)."""
    mask = np.zeros(len(spans), dtype=bool)
    for j, (a, _) in enumerate(spans):
        if a >= start:
            mask[j] = True
            if a >= end:
                break
    return mask


def reply_text(record: dict[str, Any], think_open: str, think_close: str) -> str:
    """The assistant turn: the thought summary in a reasoning span, then the answer."""
    thoughts = (record.get("thoughts") or "").strip()
    if not thoughts:
        return record["text"]
    return f"{think_open}\n{thoughts}\n{think_close}\n\n{record['text']}"


def records_to_examples(
    out_dir: Any,
    tokenizer: Any,
    *,
    think_open: str = "<think>",
    think_close: str = "</think>",
    k: int = 20,
    keys: list[str] | None = None,
):
    """(examples, targets, coverage) from the answered, untruncated records at `out_dir`
    (only those with `keys`, in that order, when given).

    examples: list[TokenizedExample], mask on the assistant reply and its end-of-turn token.
    targets: per example (ids (T, k) int32, logprobs (T, k) float32) or None without log-probs.
    coverage: records used/skipped, and over answer tokens of records with log-probs the
    fraction of positions with a target and the mean teacher mass those targets cover.
    """
    hf = _hf(tokenizer)
    if not getattr(hf, "chat_template", None):
        raise BadInput("the student tokenizer has no chat template; sequence KD needs one")
    strings: list[str | None] | None = None
    examples, targets = [], []
    totals = {"positions": 0.0, "covered": 0.0, "mass": 0.0}
    skipped = 0
    with_logprobs = 0
    records = read_records(out_dir, keys)
    exact = {"checked": 0, "agree": 0}
    if any(r.get("tokens") for r in records):
        raw, byte_ids = _raw_piece_strings(tokenizer)  # one pass over the vocabulary
        strings = _without_shadowed_bytes(raw, byte_ids)
        exact = exact_ids(records, raw)
    use_ids = exact["checked"] > 0 and exact["agree"] == exact["checked"]
    for record in records:
        if record.get("status") != "ok" or record.get("finish_reason") != "stop":
            skipped += 1  # failed, or cut off at max_output_tokens: not worth imitating
            continue
        reply = reply_text(record, think_open, think_close)
        user = [{"role": "user", "content": record["prompt"]}]
        head = hf.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = hf.apply_chat_template(
            user + [{"role": "assistant", "content": reply}], tokenize=False
        )
        reply_at = full.rfind(reply)
        answer_at = full.rfind(record["text"])
        if reply_at < 0 or answer_at < 0:
            skipped += 1  # the template rewrote the reply (e.g. dropped the reasoning span)
            continue
        assistant_from = next(
            (i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), reply_at)
        )
        ids, spans = encode_offsets(tokenizer, full)
        mask = reply_mask(spans, assistant_from, answer_at + len(record["text"]))
        examples.append(
            TokenizedExample(
                tokens=np.array(ids, dtype=np.int32),
                mask=mask,
                text={
                    "key": record["key"],
                    "id": record.get("id"),
                    "prompt": record["prompt"],
                    "completion": reply,
                    "reference": record.get("reference"),
                },
            )
        )
        if not record.get("tokens"):
            targets.append(None)
            continue
        if strings is None:
            strings = piece_strings(tokenizer)
        with_logprobs += 1
        t_ids, t_lps, stats = align_targets(
            full, answer_at, record["text"], record["tokens"], ids, spans, strings, k, use_ids
        )
        targets.append((t_ids, t_lps))
        for name in totals:
            totals[name] += stats[name]
    positions = totals["positions"]
    coverage = {
        "records": len(examples),
        "skipped": skipped,
        "with_logprobs": with_logprobs,
        "positions": int(positions),
        "covered_positions": int(totals["covered"]),
        "position_fraction": totals["covered"] / positions if positions else 0.0,
        "mass_fraction": totals["mass"] / positions if positions else 0.0,
        # teacher ids checked against the student's pieces; all agree: ids used as they are
        "ids_checked": exact["checked"],
        "ids_agree": exact["agree"],
        "exact_ids": use_ids,
    }
    return examples, targets, coverage
