"""The chat encoder on real tokenizers: every turn kept, assistant turns trained, each ending
with the template's own end-of-turn token; seams; the plain format; bad records."""

import json

import pytest
from real_tokenizers import FACTS, available, load
from tiny import true_spans

from mlx_distill.errors import BadInput
from mlx_distill.text.chat import ChatEncoder, end_of_turn, reasoning_span
from mlx_distill.text.data import read_jsonl

TURNS = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.mark.parametrize("name", ["qwen2", "llama3", "gemma4"])
def test_assistant_turns_trained_each_ending_with_the_end_of_turn_token(name):
    if not available(name):
        pytest.skip(f"no {name} fixture")
    tok = load(name)
    eot = tok.convert_tokens_to_ids(FACTS[name]["end_of_turn"])
    assert end_of_turn(tok) == (FACTS[name]["end_of_turn"], eot)
    whole = tok.apply_chat_template(TURNS, tokenize=False)
    for train_on, answers in (("assistant", ["Paris.", "Rome."]), ("last", ["Rome."])):
        (ex,) = ChatEncoder(tok, max_len=4096, train_on=train_on).encode({"messages": TURNS})
        ids = ex.tokens.tolist()
        assert whole.startswith(tok.decode(ids, skip_special_tokens=False))  # all turns kept
        assert "You answer in one word." in tok.decode(ids)  # the system turn too
        assert ids[-1] == eot  # the sequence ends at the last trained turn's end
        spans = true_spans(ex.mask)
        assert len(spans) == len(answers)
        for (a, b), answer in zip(spans, answers):
            assert ids[b - 1] == eot
            text = tok.decode(ids[a:b], skip_special_tokens=False)
            assert text == answer + FACTS[name]["end_of_turn"]
        # The untrained part is exactly the prompt side: rendering up to each answer.
        first = spans[0][0]
        head = tok.apply_chat_template(
            TURNS[: 2 if train_on == "assistant" else 4], tokenize=False, add_generation_prompt=True
        )
        assert head.startswith(tok.decode(ids[:first], skip_special_tokens=False))


def test_a_seam_inside_one_pretoken_is_cut_at_the_boundary():
    # Qwen2's pre-tokenizer merges "assistant\n" + "\n\nHi" into one "\n\n\n" piece: the prompt
    # is not a token prefix of the whole, so the encoder tokenizes the two sides apart.
    if not available("qwen2"):
        pytest.skip("no qwen2 fixture")
    tok = load("qwen2")
    record = {"prompt": "Say hi", "completion": "\n\nHi"}
    (ex,) = ChatEncoder(tok, max_len=4096).encode(record)
    head = tok.apply_chat_template(
        [{"role": "user", "content": "Say hi"}], tokenize=False, add_generation_prompt=True
    )
    head_ids = tok.encode(head, add_special_tokens=False)
    whole_ids = tok.encode(head + "\n\nHi<|im_end|>", add_special_tokens=False)
    assert whole_ids[: len(head_ids)] != head_ids  # the case this test is about
    assert ex.tokens[: len(head_ids)].tolist() == head_ids
    assert not ex.mask[: len(head_ids)].any() and ex.mask[len(head_ids) :].all()
    assert tok.decode(ex.tokens[ex.mask].tolist(), skip_special_tokens=False) == (
        "\n\nHi<|im_end|>"
    )


def test_end_of_turn_differs_from_eos_and_reasoning_span_comes_from_the_tokenizer():
    if not available("gemma4"):
        pytest.skip("no gemma4 fixture")
    tok = load("gemma4")
    assert tok.eos_token == "<eos>" and end_of_turn(tok)[0] == "<turn|>"
    assert reasoning_span(tok) == ("<|channel>thought\n", "<channel|>")
    assert reasoning_span(tok, "<r>", "</r>") == ("<r>", "</r>")
    assert reasoning_span(load("qwen2")) == ("<think>", "</think>")  # text: no such tokens


def test_plain_format_without_a_chat_template(tmp_path):
    if not available("llama3"):
        pytest.skip("no llama3 fixture")
    tok = load("llama3")
    saved = tok._tokenizer.chat_template
    tok._tokenizer.chat_template = None
    try:
        enc = ChatEncoder(tok, max_len=4096)
        (ex,) = enc.encode({"messages": TURNS})
    finally:
        tok._tokenizer.chat_template = saved
    text = tok.decode(ex.tokens.tolist(), skip_special_tokens=False)
    assert enc.end_text == tok.eos_token
    assert text == (
        "<|begin_of_text|>You answer in one word.\n\nCapital of France?\n\nParis.<|eot_id|>"
        "And of Italy?\n\nRome.<|eot_id|>"
    )
    spans = [
        tok.decode(ex.tokens[a:b].tolist(), skip_special_tokens=False)
        for a, b in true_spans(ex.mask)
    ]
    assert spans == ["Paris.<|eot_id|>", "Rome.<|eot_id|>"]


def test_a_template_that_cannot_render_a_record_names_file_and_line(tmp_path):
    if not available("qwen2"):
        pytest.skip("no qwen2 fixture")
    tok = load("qwen2")
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "a", "completion": "b"}, {"messages": TURNS}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    saved = tok._tokenizer.chat_template
    # Like Gemma 2's template: no system role.
    tok._tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    try:
        enc = ChatEncoder(tok, max_len=4096)
        records = read_jsonl(path)
        enc.encode(records[0])
        with pytest.raises(BadInput, match=f"{path} line 2: .*System role not supported"):
            enc.encode(records[1])
    finally:
        tok._tokenizer.chat_template = saved
