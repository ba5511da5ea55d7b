"""Tokenizer training/export, chat encoding, and the JSONL readers."""

import json

import pytest
import sentencepiece as spm

from mlx_distill.errors import BadInput
from mlx_distill.tasks import arithmetic
from mlx_distill.text.chat import ChatEncoder
from mlx_distill.text.data import read_jsonl
from mlx_distill.text.tokenizer import (
    load_tokenizer,
    prompt_text,
    train_sentencepiece,
    vocab_hash,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    problems = arithmetic.generate(600, 3)
    out = tmp_path_factory.mktemp("tok")
    train_sentencepiece(
        [p["prompt"] + "\n" + p["completion"] for p in problems], out, vocab_size=200
    )
    return out


def test_hf_tokenizer_matches_sentencepiece(tokenizer_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "sentencepiece.model"))
    tok = load_tokenizer(tokenizer_dir)
    for p in arithmetic.generate(300, 11):
        for text in (p["prompt"], "so 123+45=168 and more"):
            assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    # Digits are single tokens: numbers the model never saw still encode without <unk>.
    ids = tok.encode("987654", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids if tok.decode([i])] == list("987654")


def test_chat_encoding_masks_the_answer_only(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    p = arithmetic.generate(1, 5)[0]
    encoder = ChatEncoder(tok, max_len=512)
    (ex,) = encoder.encode(p)
    head = tok.encode(prompt_text(tok, p["prompt"]), add_special_tokens=False)
    assert list(ex.tokens[: len(head)]) == head
    assert not ex.mask[: len(head)].any() and ex.mask[len(head) :].all()
    # The end-of-turn token is found from the template: this tokenizer's is its EOS.
    assert encoder.end_id == tok.eos_token_id and ex.tokens[-1] == tok.eos_token_id
    assert tok.decode(ex.tokens[ex.mask].tolist()) == p["completion"] + encoder.end_text
    short_encoder = ChatEncoder(tok, max_len=len(head) + 3)
    (short,) = short_encoder.encode(p)
    assert len(short.tokens) == len(head) + 3 and short.mask.sum() == 3
    assert short_encoder.counts.cut == 1 and encoder.counts.cut == 0


def test_vocab_hash_distinguishes_tokenizers(tokenizer_dir, tmp_path):
    other = train_sentencepiece(["completely different text " * 20] * 50, tmp_path, vocab_size=60)
    assert vocab_hash(load_tokenizer(tokenizer_dir)) == vocab_hash(load_tokenizer(tokenizer_dir))
    assert vocab_hash(load_tokenizer(tokenizer_dir)) != vocab_hash(load_tokenizer(other))


def test_jsonl_shapes(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "p", "completion": "c", "answer": "1"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"text": "plain"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = read_jsonl(path)
    assert [(r["prompt"], r["completion"]) for r in out] == [("p", "c"), ("u", "a"), ("", "plain")]
    assert out[0]["answer"] == "1"
    assert len(read_jsonl(path, limit=2)) == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 1: invalid JSON"),
        ('{"prompt": "p"}', "line 1: expected keys"),
        ('{"messages": [{"role": "user", "content": "u"}]}', "line 1: messages have no assistant"),
        ('{"messages": [{"role": "bot", "content": "u"}]}', "line 1: message 1 has role 'bot'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(BadInput, match=message):
        read_jsonl(path)
    with pytest.raises(BadInput, match="not found"):
        read_jsonl(tmp_path / "none.jsonl")


# sha256 over (tokens int32 LE, mask uint8) of each row, taken with the encoder before the chat
# encoder replaced it (`encode_example(tok, prompt, completion, 129)`, quickstart tokenizer).
QUICKSTART_IDS = {
    ("train", 2000): "68c3233954a5d7ceab952b040adae28d1f822f38f97d1299a6fdd946e8a800d2",
    ("test", 500): "f3e68b5fdc1374e5cd16428a3fae490930da91b95c3cc0cf76896ef3552c364c",
}


@pytest.mark.parametrize("split, n", list(QUICKSTART_IDS))
def test_quickstart_ids_and_masks_are_unchanged(split, n):
    import hashlib
    from pathlib import Path

    import numpy as np

    root = Path(__file__).resolve().parents[1] / "data" / "quickstart"
    tok = load_tokenizer(root / "teacher")
    encoder = ChatEncoder(tok, max_len=129)
    digest = hashlib.sha256()
    for record in read_jsonl(root / f"{split}.jsonl", limit=n):
        (ex,) = encoder.encode(record)
        digest.update(ex.tokens.astype("<i4").tobytes())
        digest.update(ex.mask.astype(np.uint8).tobytes())
    assert digest.hexdigest() == QUICKSTART_IDS[split, n]


def test_messages_keep_every_turn_and_text_records_end_with_eos(tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    path = tmp_path / "d.jsonl"
    turns = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"},
    ]
    path.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"text": "3+3=6"}) + "\n")
    chat, text = read_jsonl(path)
    assert chat["messages"] == turns and chat.source == f"{path} line 1"
    whole = tok.apply_chat_template(turns, tokenize=False)
    for train_on, answers in (("assistant", ["2", "4"]), ("last", ["4"])):
        (ex,) = ChatEncoder(tok, max_len=512, train_on=train_on).encode(chat)
        assert tok.decode(ex.tokens.tolist()) + "\n" == whole  # every turn, system included
        ids, mask = ex.tokens.tolist(), ex.mask.tolist()
        spans = [ids[i] for i in range(len(ids)) if mask[i]]
        assert tok.decode(spans) == "".join(a + "<|end|>" for a in answers)
    (ex,) = ChatEncoder(tok, max_len=512).encode(text)
    assert ex.mask[1:].all() and ex.tokens[-1] == tok.eos_token_id
    assert tok.decode(ex.tokens.tolist()) == "<s>3+3=6<|end|>"
