"""Tokenizer training/export, chat encoding, and the JSONL readers."""

import json

import pytest
import sentencepiece as spm

from mlx_distill.errors import BadInput
from mlx_distill.tasks import arithmetic
from mlx_distill.text.data import read_jsonl
from mlx_distill.text.tokenizer import (
    EOS,
    encode_example,
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
    ex = encode_example(tok, p["prompt"], p["completion"], max_len=512)
    head = tok.encode(prompt_text(tok, p["prompt"]), add_special_tokens=False)
    assert list(ex.tokens[: len(head)]) == head
    assert not ex.mask[: len(head)].any() and ex.mask[len(head) :].all()
    assert tok.decode(ex.tokens[ex.mask].tolist()) == p["completion"] + EOS
    assert ex.tokens[-1] == tok.eos_token_id
    short = encode_example(tok, p["prompt"], p["completion"], max_len=len(head) + 3)
    assert len(short.tokens) == len(head) + 3 and short.mask.sum() == 3


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
        ('{"messages": [{"role": "user", "content": "u"}]}', "ending with an assistant turn"),
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
