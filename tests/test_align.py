"""Cross-tokenizer alignment of Gemini top-k candidates onto student tokenizers (hand-made)."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest

from mlx_distill.teachers.align import align_targets, encode_offsets, piece_strings

WORDS = "the cat dog sat on mat ran to a big red hat and is four apples answer".split()
TEXT = "Q: red hat?\nA: The cat sat on four apples."
ANSWER = "The cat sat on four apples."


def corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        + rng.choice([".", "?", "!", ","])
        + f" {rng.randint(0, 999)}"
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        vocab_size=370,
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        minloglevel=2,
        num_threads=1,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def align(sp, tokens, k=20):
    ids, spans = encode_offsets(sp, TEXT)
    out_ids, out_lps, stats = align_targets(
        TEXT, TEXT.index(ANSWER), ANSWER, tokens, ids, spans, piece_strings(sp), k
    )
    return ids, out_ids, out_lps, stats


def row(sp, ids, out_ids, out_lps, piece: str) -> dict[str, float]:
    """The targets at the position that predicts the student token `piece` in the answer."""
    j = max(i for i, t in enumerate(ids) if sp.id_to_piece(t) == piece)
    keep = np.isfinite(out_lps[j - 1])
    pairs = zip(out_ids[j - 1][keep], out_lps[j - 1][keep])
    return {sp.id_to_piece(int(i)): float(lp) for i, lp in pairs}


def test_student_tokenization_is_what_the_cases_assume(sp):
    ids, spans = encode_offsets(sp, TEXT)
    answer = TEXT.index(ANSWER)
    pieces = [sp.id_to_piece(i) for i, (a, _) in zip(ids, spans) if a >= answer]
    assert pieces == ["<0x54>", "he", "▁cat", "▁sat", "▁on", "▁four", "▁apples", "."]
    assert "".join(TEXT[a:b] for a, b in spans) == TEXT  # spans tile the text
    strings = piece_strings(sp)
    assert strings[sp.piece_to_id("▁apples")] == " apples"
    assert strings[sp.piece_to_id("<0x0A>")] == "\n" and strings[sp.piece_to_id("▁")] == " "
    assert strings[sp.piece_to_id("<0x20>")] is None  # " " has a regular piece: "▁"


def test_same_boundaries_map_single_token_candidates(sp):
    tokens = [
        ["The", -0.1, [["The", -0.1], ["A", -2.5], ["This", -3.0]]],
        [" cat", -0.2, [[" cat", -0.2], [" dog", -1.9], [" cow", -4.0]]],
        [" sat", -0.3, [[" sat", -0.3], [" ran", -2.0], [" ran", -2.5]]],  # same string twice
        [" on", -0.05, []],  # chosen token absent from the top list: still a target
        [" four", -0.4, [[" four", -0.4], ["zzq", -1.2]]],
        [" apples", -0.01, [[" apples", -0.01]]],
        [".", -0.02, [[".", -0.02], ["!", -4.5]]],
    ]
    ids, out_ids, out_lps, stats = align(sp, tokens)
    assert out_ids.shape == (len(ids), 20) and out_lps.dtype == np.float32
    # "The" is two student tokens (T + he): only the one-token alternative "A" survives.
    assert row(sp, ids, out_ids, out_lps, "<0x54>") == {"<0x41>": pytest.approx(-2.5)}
    assert row(sp, ids, out_ids, out_lps, "he") == {}  # no teacher token starts there
    assert row(sp, ids, out_ids, out_lps, "▁cat") == {
        "▁cat": pytest.approx(-0.2),
        "▁dog": pytest.approx(-1.9),
    }
    merged = math.log(math.exp(-2.0) + math.exp(-2.5))
    assert row(sp, ids, out_ids, out_lps, "▁sat") == {
        "▁sat": pytest.approx(-0.3),
        "▁ran": pytest.approx(merged, abs=1e-6),
    }
    assert row(sp, ids, out_ids, out_lps, "▁on") == {"▁on": pytest.approx(-0.05)}
    assert row(sp, ids, out_ids, out_lps, "▁four") == {"▁four": pytest.approx(-0.4)}
    assert row(sp, ids, out_ids, out_lps, ".") == {
        ".": pytest.approx(-0.02),
        "!": pytest.approx(-4.5),
    }
    assert stats["positions"] == 8 and stats["covered"] == 7
    expected_mass = (
        math.exp(-2.5) + math.exp(-0.2) + math.exp(-1.9) + math.exp(-0.3) + math.exp(merged)
        + math.exp(-0.05) + math.exp(-0.4) + math.exp(-0.01) + math.exp(-0.02) + math.exp(-4.5)
    )  # fmt: skip
    assert stats["mass"] == pytest.approx(expected_mass, rel=1e-5)
    # Rows outside the answer stay empty; k truncates to the most likely candidates.
    answer_rows = {j - 1 for j, (a, _) in enumerate(encode_offsets(sp, TEXT)[1]) if a >= 15}
    assert all(np.isneginf(out_lps[t]).all() for t in range(len(ids)) if t not in answer_rows)
    _, ids1, lps1, _ = align(sp, tokens, k=1)
    assert row(sp, ids, ids1, lps1, "▁cat") == {"▁cat": pytest.approx(-0.2)}


def test_boundaries_that_differ_or_text_that_diverges(sp):
    # "Th" + "e c" + "at" straddle the student's T|he|▁cat boundaries: only offsets 0 and 7 agree.
    split = [
        ["Th", -0.5, [["Th", -0.5], ["T", -1.0]]],
        ["e c", -0.5, [["e c", -0.5]]],
        ["at", -0.5, [["at", -0.5]]],
        [" sat", -0.3, [[" sat", -0.3]]],
    ]
    ids, out_ids, out_lps, stats = align(sp, split)
    assert row(sp, ids, out_ids, out_lps, "<0x54>") == {"<0x54>": pytest.approx(-1.0)}
    assert row(sp, ids, out_ids, out_lps, "▁cat") == {}
    assert row(sp, ids, out_ids, out_lps, "▁sat") == {"▁sat": pytest.approx(-0.3)}
    assert (stats["positions"], stats["covered"]) == (8, 2)
    # Teacher tokens that stop spelling the answer (" sits" vs " sat") align up to that point.
    diverged = [["T", -0.1, []], ["he", -0.1, []], [" cat", -0.1, []], [" sits", -0.1, []],
                [" on", -0.1, []]]  # fmt: skip
    ids, out_ids, out_lps, stats = align(sp, diverged)
    assert row(sp, ids, out_ids, out_lps, "he") == {"he": pytest.approx(-0.1)}
    assert row(sp, ids, out_ids, out_lps, "▁on") == {}
    assert stats["covered"] == 3


TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MARKERS = ["<unk>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>"]


def hf_student(kind: str, tmp_path):
    """A tiny trained student tokenizer with a chat template: HF byte-level BPE, HF Metaspace
    BPE, or the project's own SentencePiece tokenizer behind mlx-lm's TokenizerWrapper."""
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if kind == "project":
        from mlx_distill.text.tokenizer import load_tokenizer, train_sentencepiece

        return load_tokenizer(train_sentencepiece(corpus(), tmp_path / "tok", vocab_size=120))

    base = ByteLevelBPETokenizer() if kind == "bytelevel" else SentencePieceBPETokenizer()
    base.train_from_iterator(corpus(), vocab_size=300, special_tokens=MARKERS, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=base._tokenizer, eos_token="<|end|>")
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace", "project"])
def test_records_to_examples_masks_reply_and_aligns(kind, tmp_path, monkeypatch):
    from fake_gemini import FakeGemini

    from mlx_distill.cache.records import read_records
    from mlx_distill.recipe import load_recipe
    from mlx_distill.teachers.align import records_to_examples
    from mlx_distill.teachers.gemini import run_gemini_teacher

    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    prompts = [
        {"prompt": f"Where is the cat? [ans={ANSWER}]"},
        {"prompt": "Is it red? [ans=The big red hat is on a dog.]"},
        {"prompt": "No logprobs here. [avgonly] [ans=A cat ran.]"},
        {"prompt": "Refused. [400]"},
        {"prompt": "Too long. [maxtokens]"},
    ]
    out = tmp_path / "records"
    with FakeGemini(key="test-key") as fake:
        sets = [f"teacher.gemini.base_url={fake.base_url}", "teacher.gemini.logprobs=20"]
        run_gemini_teacher(load_recipe(None, sets), prompts, out, progress=False)
    tok = hf_student(kind, tmp_path)
    examples, targets, coverage = records_to_examples(out, tok, k=20)
    assert len(examples) == len(targets) == 3
    assert coverage["records"] == 3 and coverage["skipped"] == 2
    assert coverage["with_logprobs"] == 2
    assert 0.5 < coverage["position_fraction"] <= 1.0
    assert 0.0 < coverage["mass_fraction"] <= coverage["position_fraction"]
    records = {r["key"]: r for r in read_records(out)}
    strings = piece_strings(tok)
    for ex, tgt in zip(examples, targets):
        record = records[ex.text["key"]]
        reply = f"<think>\n{record['thoughts']}\n</think>\n\n{record['text']}"
        assert ex.text["completion"] == reply
        user = [{"role": "user", "content": record["prompt"]}]
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": reply}],
                                       tokenize=False)  # fmt: skip
        ids, spans = encode_offsets(tok, full)
        assert ex.tokens.tolist() == ids
        head = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        assert full == head + reply + "<|end|>\n"
        # The mask covers exactly the reply and its end token: chars [len(head), len(full) - 1).
        inside = [len(head) <= a < len(full) - 1 for a, _ in spans]
        assert ex.mask.tolist() == inside
        assert max(b for (_, b), m in zip(spans, ex.mask) if m) == len(full) - 1
        if "[avgonly]" in record["prompt"]:
            assert tgt is None and record["tokens"] is None
            continue
        t_ids, t_lps = tgt
        assert t_ids.shape == (len(ids), 20) and t_ids.dtype == np.int32
        assert t_lps.dtype == np.float32
        has = np.isfinite(t_lps).any(axis=1)
        assert all(ex.mask[t + 1] for t in np.nonzero(has)[0])  # targets only on the reply
        # Where a student token is exactly the teacher's chosen token at the same character,
        # the top target is that student token with the teacher's log-prob.
        at, chosen = full.rfind(record["text"]), {}
        for token, lp, *_ in record["tokens"]:
            chosen[at] = (token, lp)
            at += len(token)
        exact = 0
        for j in range(1, len(ids)):
            piece, b = strings[ids[j]], spans[j][1]
            if (
                piece
                and full[b - len(piece) : b] == piece
                and chosen.get(b - len(piece), ("",))[0] == piece
            ):
                exact += 1
                assert t_ids[j - 1, 0] == ids[j]
                assert t_lps[j - 1, 0] == pytest.approx(chosen[b - len(piece)][1], rel=1e-6)
        assert exact >= 3
