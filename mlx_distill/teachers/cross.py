"""A local teacher's answers as the student's rows, across tokenizers.

Rows. Each training conversation becomes (context, answer): the turns before its last assistant
turn, and that turn's content (`teacher.answers: data`) or the teacher's own answer to the
context (`teacher.answers: generate`; `generate_answers` stores them durably in the teacher
stage's records, so a resumed run never decodes an answer twice). The student's row is its chat
template's rendering of the context with the answer as the assistant turn, trained on the answer
and the end-of-turn token after it (`student_rows`).

Targets. With a shared vocabulary the cache stage scores these rows as it scores any
(`LocalTeacher.score`). A teacher with another tokenizer (`CrossTeacher`) reads the same answer
in its own tokens after its own template's prompt (teacher forcing) and gives, at each answer
token, its top-k candidates. Its steps are laid on the answer text by character offsets (a
character split over several byte pieces is one step, its log-prob the sum of the pieces'), and
`align.align_targets` (the Gemini alignment) makes each candidate whose text is exactly one
student token a sparse target at the student position that starts at the same character.
Positions without a match keep the label (CE) and the teacher mass outside the matched
candidates goes to the loss's tail bucket; the coverage (positions with targets, teacher mass
covered) is reported.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_distill.cache.records import RecordStore, read_records, record_key
from mlx_distill.cache.sparse import RowTargets
from mlx_distill.errors import BadInput
from mlx_distill.teachers.align import align_targets, encode_offsets, piece_strings, reply_mask
from mlx_distill.teachers.gemini_cache import row_targets
from mlx_distill.text.chat import (
    end_of_turn,
    generation_prompt,
    has_template,
    record_messages,
    record_shape,
    render,
)
from mlx_distill.text.examples import TokenizedExample
from mlx_distill.text.tokenizer import vocab_hash


def conversation(record: dict, where: str) -> tuple[list[dict], str]:
    """(the turns before the record's last assistant turn, that turn's text)."""
    if record_shape(record) == "text":
        raise BadInput(
            f"{where}: a plain-text record; a teacher with another tokenizer and "
            "teacher.answers: generate need chat records (prompt/completion or messages)"
        )
    messages = record_messages(record)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if record.get("tools") or any(m.get("tool_calls") for m in messages[: last + 1]):
        raise BadInput(
            f"{where}: tool use; a teacher with another tokenizer and teacher.answers: generate "
            "learn from text answers (tools and tool calls are trained with a shared tokenizer "
            "and teacher.answers: data)"
        )
    return messages[:last], messages[last]["content"]


@dataclass
class Row:
    """One student row: its example (cut to max_len) and what the alignment needs: the full
    rendered text, where the answer starts in it, and its whole tokenization with spans."""

    context: list[dict]
    answer: str
    example: TokenizedExample
    full: str
    answer_at: int
    ids: list[int]
    spans: list[tuple[int, int]]


def _student_text(tokenizer, context: list[dict], answer: str, where: str) -> tuple[str, str]:
    head = generation_prompt(tokenizer, context, where)
    if has_template(tokenizer):
        turns = context + [{"role": "assistant", "content": answer}]
        return head, render(tokenizer, turns, generation_prompt=False, where=where)
    return head, head + answer + end_of_turn(tokenizer)[0]


def student_rows(
    tokenizer, pairs: list[tuple[list[dict], str]], *, max_len: int, what: str
) -> tuple[list[Row], dict[str, int]]:
    """The student's rows for (context, answer) pairs, and counts of the rows left out: empty
    answers, answers the template rewrites (e.g. drops a reasoning span from), rows with no
    trained token left after the cut at max_len; and of rows shortened by it."""
    rows: list[Row] = []
    counts = {"empty": 0, "rewritten": 0, "dropped": 0, "shortened": 0}
    for n, (context, answer) in enumerate(pairs):
        if not answer.strip():
            counts["empty"] += 1
            continue
        head, full = _student_text(tokenizer, context, answer, f"{what} row {n + 1}")
        answer_at = full.rfind(answer)
        if answer_at < 0:
            counts["rewritten"] += 1
            continue
        # the assistant's part starts where the rendering leaves the generation prompt
        start = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), len(head))
        start = min(start, answer_at)
        ids, spans = encode_offsets(tokenizer, full)
        mask = reply_mask(spans, start, answer_at + len(answer))
        if len(ids) > max_len:
            if not mask[1:max_len].any():
                counts["dropped"] += 1
                continue
            counts["shortened"] += 1
        example = TokenizedExample(
            tokens=np.array(ids[:max_len], np.int32),
            mask=mask[:max_len],
            text={"prompt": context[-1]["content"] if context else "", "completion": answer},
        )
        rows.append(Row(context, answer, example, full, answer_at, ids, spans))
    left_out = counts["empty"] + counts["rewritten"] + counts["dropped"]
    if left_out or counts["shortened"]:
        print(
            f"warning: {what}: {len(pairs)} answers -> {len(rows)} rows ({counts['empty']} empty, "
            f"{counts['rewritten']} rewritten by the student's chat template and "
            f"{counts['dropped']} with no trained token within data.max_seq_len left out; "
            f"{counts['shortened']} shortened to {max_len} tokens)",
            file=sys.stderr,
        )
    return rows, counts


# -- the teacher's own answers (teacher.answers: generate) -----------------------------------


def answer_key(teacher_version: str, params: dict[str, Any], context: list[dict]) -> str:
    """The records key of the teacher's answer to `context` with generation `params`."""
    return record_key(teacher_version, params, json.dumps(context, ensure_ascii=False))


def generate_answers(
    teacher, contexts: list[list[dict]], out_dir: Path, params: dict[str, Any], *, seed: int
) -> dict[str, Any]:
    """Answer each unique context with the teacher into the records store at `out_dir`, in
    batches of params["batch_size"], each batch durable before the next; contexts answered
    before (same teacher weights and generation params) are not decoded again.

    params: max_tokens, temperature, top_p, batch_size. Returns counts and the keys in order."""
    from tqdm import tqdm

    keys = [answer_key(teacher.version, params, c) for c in contexts]
    unique = dict(zip(keys, contexts))
    identity = {"id": teacher.id, "params": {**params, "version": teacher.version}}
    with RecordStore(out_dir, identity) as store:
        todo = [(k, c) for k, c in unique.items() if store.status(k) != "ok"]
        bs = params["batch_size"]
        bar = tqdm(total=len(todo), desc="teacher answers", unit="answer", file=sys.stderr)
        for b0 in range(0, len(todo), bs):
            batch = todo[b0 : b0 + bs]
            prompts = [_teacher_prompt(teacher.tokenizer, c) for _, c in batch]
            answers = teacher.generate_ids(
                prompts,
                max_tokens=params["max_tokens"],
                temperature=params["temperature"],
                top_p=params["top_p"],
                seed=seed + b0,
                batch_size=bs,
            )
            store.append(
                [
                    {
                        "key": key,
                        "status": "ok",
                        "context": context,
                        "text": text,
                        "finish_reason": reason,
                        "usage": {"prompt": len(p), "answer": len(ids)},
                    }
                    for (key, context), p, (text, ids, reason) in zip(batch, prompts, answers)
                ]
            )
            bar.update(len(batch))
        bar.close()
    stored = {r["key"]: r for r in read_records(out_dir, list(unique))}
    cut = sum(r["finish_reason"] != "stop" for r in stored.values())
    return {"keys": keys, "answered": len(stored), "decoded": len(todo), "cut_off": cut}


def stored_pairs(out_dir: Path, keys: list[str]) -> tuple[list[tuple[list[dict], str]], int]:
    """(context, answer) for each key whose stored answer ended on its own; and the count of
    answers left out as cut off at teacher.generation.max_tokens (not worth imitating)."""
    stored = {r["key"]: r for r in read_records(out_dir, list(dict.fromkeys(keys)))}
    missing = [k for k in keys if k not in stored]
    if missing:
        raise BadInput(
            f"{out_dir}: {len(missing)} of the teacher's answers are missing; run the teacher "
            "stage again (`mlx-distill teach RECIPE`)"
        )
    pairs, cut = [], 0
    for key in keys:
        record = stored[key]
        if record["finish_reason"] != "stop":
            cut += 1
            continue
        pairs.append((record["context"], record["text"]))
    return pairs, cut


def _teacher_prompt(tokenizer, context: list[dict]) -> list[int]:
    text = generation_prompt(tokenizer, context, "the teacher's prompt")
    return list(tokenizer.encode(text, add_special_tokens=False))


# -- token-level targets across tokenizers -----------------------------------------------------


def teacher_steps(
    answer: str,
    spans: list[tuple[int, int]],
    chosen: np.ndarray,
    cand_ids: np.ndarray,
    cand_lps: np.ndarray,
    strings: list[str | None],
) -> list[list]:
    """The teacher's answer tokens as alignment steps [text, logprob, [[candidate, logprob]]]
    whose texts spell the answer from its start.

    spans: each teacher token's character span in `answer`. A token whose span ends where the
    text so far ends (the later byte pieces of one character) joins the step before it: the
    step's text then spans the whole character and its log-prob is the joint one."""
    steps: list[list] = []
    pos = 0
    for i, (_, end) in enumerate(spans):
        if end <= pos and steps:
            steps[-1][1] += float(chosen[i])
            continue
        alternatives = [
            [strings[c], float(lp)]
            for c, lp in zip(cand_ids[i], cand_lps[i])
            if np.isfinite(lp) and c < len(strings) and strings[c]
        ]
        steps.append([answer[pos:end], float(chosen[i]), alternatives])
        pos = max(pos, end)
    return steps


class CrossTeacher:
    """The `teacher.score` that `build_token_cache` calls for a local teacher with another
    tokenizer: each requested row is read by the teacher in its own tokens, its candidates
    aligned to the student's (module docstring). `coverage()` sums what was aligned."""

    def __init__(self, teacher, rows: list[Row], student_tokenizer, *, k: int, temperature: float):
        self.teacher = teacher
        self.rows = rows
        self.k = k
        self.temperature = temperature
        self.id = teacher.id
        self.params = {**teacher.params, "teacher_vocab_hash": teacher.vocab_hash}
        self.version = teacher.version
        self.vocab_hash = vocab_hash(student_tokenizer)
        self.vocab_size = max(student_tokenizer.get_vocab().values()) + 1
        self.student_strings = piece_strings(student_tokenizer)
        self.teacher_strings = piece_strings(teacher.tokenizer)
        self.student_end = end_of_turn(student_tokenizer)[1]
        self.teacher_end = end_of_turn(teacher.tokenizer)[1]
        self._lookup: dict[str, int] = {}
        for sid, text in enumerate(self.student_strings):
            if text:
                self._lookup.setdefault(text, sid)
        self.totals = {"rows": 0, "positions": 0.0, "covered": 0.0, "mass": 0.0}

    def score(self, rows, *, row_ids, **_: Any) -> list[RowTargets]:
        tok = self.teacher.tokenizer
        seqs, starts, spans = [], [], []
        for i in row_ids:
            row = self.rows[i]
            prompt = _teacher_prompt(tok, row.context)
            ids, offsets = encode_offsets(tok, row.answer)
            seqs.append(np.array(prompt + ids + [self.teacher_end], dtype=np.int32))
            starts.append(len(prompt))
            spans.append(offsets)
        scores = self.teacher.answer_logprobs(seqs, starts, k=self.k, temperature=self.temperature)
        out = []
        for i, offsets, (chosen, cand_ids, cand_lps) in zip(row_ids, spans, scores):
            row = self.rows[i]
            strings = self.teacher_strings
            steps = teacher_steps(row.answer, offsets, chosen, cand_ids, cand_lps, strings)
            ids, lps, stats = align_targets(
                row.full, row.answer_at, row.answer, steps, row.ids, row.spans,
                self.student_strings, self.k,
            )  # fmt: skip
            end_ids, end_lps = cand_ids[-1], cand_lps[-1]
            if self.teacher_end not in end_ids:  # its own end of turn, always
                end_ids = np.append(end_ids, self.teacher_end)
                end_lps = np.append(end_lps, chosen[-1])
            self._end_targets(row, ids, lps, end_ids, end_lps)
            out.append(row_targets(row.example.mask, (ids, lps)))
            self.totals["rows"] += 1
            for name in ("positions", "covered", "mass"):
                self.totals[name] += stats[name]
        return out

    def _end_targets(self, row: Row, ids, lps, cand_ids, cand_lps) -> None:
        """Targets where the student's turn ends: the teacher's candidates after the whole
        answer (its end of turn among them), its end-of-turn token as the student's, the
        others by their text."""
        end = row.answer_at + len(row.answer)
        j = next((j for j, (a, _) in enumerate(row.spans) if a >= end), None)
        if j is None or row.ids[j] != self.student_end:
            return  # the template puts something else after the answer: no target there
        merged: dict[int, float] = {}
        for c, lp in zip(cand_ids, cand_lps):
            text = self.teacher_strings[c] if c < len(self.teacher_strings) else None
            sid = self.student_end if c == self.teacher_end else self._lookup.get(text or "")
            if (
                sid is not None
                and np.isfinite(lp)
                and not (c == self.teacher_end and sid in merged)
            ):
                merged[sid] = float(np.logaddexp(merged[sid], lp)) if sid in merged else float(lp)
        best = sorted(merged.items(), key=lambda kv: -kv[1])[: self.k]
        ids[j - 1], lps[j - 1] = 0, -np.inf
        ids[j - 1, : len(best)] = [sid for sid, _ in best]
        lps[j - 1, : len(best)] = [lp for _, lp in best]

    def coverage(self) -> dict[str, Any]:
        """Over the answer positions of the rows scored by this object (a resumed cache stage
        scores only the rows not written before)."""
        t = self.totals
        positions = t["positions"]
        return {
            "rows_scored": t["rows"],
            "positions": int(positions),
            "covered_positions": int(t["covered"]),
            "position_fraction": t["covered"] / positions if positions else 0.0,
            "mass_fraction": t["mass"] / positions if positions else 0.0,
        }
