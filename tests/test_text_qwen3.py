"""Conversations as Qwen3's own chat template renders them: its history drops <think> blocks and
its final turn always carries one, so each assistant turn is a row of its own, rendered as at
generation time; tools and tool calls in mlx-lm's format; rows the cut leaves untrained."""

import json

import pytest
from real_tokenizers import available, load
from tiny import ROOT, true_spans

from mlx_distill.errors import BadInput
from mlx_distill.text.chat import ChatEncoder, encode_records, record_prompt
from mlx_distill.text.data import read_jsonl
from mlx_distill.text.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not available("qwen3"), reason="no qwen3 fixture")

END = "<|im_end|>"
THINKING = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "<think>\nAdd them: 2 + 3 = 5.\n</think>\n\n5"},
    {"role": "user", "content": "Times 4?"},
    {"role": "assistant", "reasoning_content": "5 * 4 = 20.", "content": "20"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_USE = {
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "Is it raining in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"rain": true, "temp": 12}'},
        {"role": "assistant", "content": "Yes, it is raining (12 C)."},
    ],
}


def _records(tmp_path, *rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_jsonl(path)


def _decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def _at_generation(tok, messages, i, tools=None):
    """(prompt, turn): turn i as the template renders it when the model answers there."""
    prompt = tok.apply_chat_template(
        messages[:i], tools=tools, tokenize=False, add_generation_prompt=True
    )
    whole = tok.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False)
    assert whole.startswith(
        prompt
    )  # Qwen3's prompt ends inside the turn: "...assistant\n<think>\n"
    return prompt, whole[len(prompt) : whole.index(END, len(prompt)) + len(END)]


def bracketed(tok, ex) -> str:
    """A row decoded, special tokens shown, the trained part in [[ ]]."""
    out, at = [], 0
    for a, b in true_spans(ex.mask):
        out += [_decode(tok, ex.tokens[at:a]), "[[" + _decode(tok, ex.tokens[a:b]) + "]]"]
        at = b
    return "".join(out) + _decode(tok, ex.tokens[at:])


def test_qwen3_rewrites_history_so_each_assistant_turn_is_its_own_row(tmp_path):
    tok = load("qwen3")
    (record,) = _records(tmp_path, {"messages": THINKING})
    whole = tok.apply_chat_template(THINKING, tokenize=False)
    assert "Add them" not in whole and "5 * 4" not in whole  # the case: history loses thoughts
    encoder = ChatEncoder(tok, max_len=4096)
    rows = encoder.encode(record)
    turns = [i for i, m in enumerate(THINKING) if m["role"] == "assistant"]
    assert len(rows) == len(turns) == 3
    for n, (ex, i) in enumerate(zip(rows, turns), 1):
        prompt, turn = _at_generation(tok, THINKING, i)
        ((a, b),) = true_spans(ex.mask)  # one trained span per row: this turn
        assert b == len(ex.tokens) and ex.tokens[-1] == tok.convert_tokens_to_ids(END)
        assert _decode(tok, ex.tokens[:a]) == prompt
        assert _decode(tok, ex.tokens[a:]) == turn
        assert ex.text["turn"] == n
    # Every reasoning trace is trained, each in the turn that produced it.
    trained = [_decode(tok, ex.tokens[ex.mask]) for ex in rows]
    assert trained == [
        "Add them: 2 + 3 = 5.\n</think>\n\n5" + END,
        "5 * 4 = 20.\n</think>\n\n20" + END,
        "\n</think>\n\nYou're welcome." + END,  # the template's empty thought, as generated
    ]
    c = encoder.counts
    assert (c.records, c.rows, c.turns, c.split, c.cut, c.dropped) == (1, 3, 3, 1, 0, 0)


def test_train_on_last_keeps_one_row_with_the_last_turn_only(tmp_path):
    tok = load("qwen3")
    (record,) = _records(tmp_path, {"messages": THINKING})
    encoder = ChatEncoder(tok, max_len=4096, train_on="last")
    (ex,) = encoder.encode(record)
    prompt, turn = _at_generation(tok, THINKING, len(THINKING) - 1)
    ((a, _),) = true_spans(ex.mask)
    assert (_decode(tok, ex.tokens[:a]), _decode(tok, ex.tokens[a:])) == (prompt, turn)
    assert (encoder.counts.rows, encoder.counts.turns, encoder.counts.split) == (1, 1, 0)


def test_a_template_that_keeps_history_keeps_one_row_per_conversation(tmp_path):
    tok = load("qwen2")  # renders every turn the same inside a longer conversation
    inline = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in THINKING]
    (record,) = _records(tmp_path, {"messages": inline})
    encoder = ChatEncoder(tok, max_len=4096)
    (ex,) = encoder.encode(record)
    assert len(true_spans(ex.mask)) == 3 and "turn" not in ex.text
    assert "Add them: 2 + 3 = 5." in _decode(tok, ex.tokens[ex.mask])  # a thought as text
    assert (encoder.counts.rows, encoder.counts.turns, encoder.counts.split) == (1, 3, 0)
    # Its template has no place for reasoning_content: refused, not silently left out.
    (record,) = _records(tmp_path, {"messages": THINKING})
    with pytest.raises(BadInput, match="does not render the reasoning_content of assistant turn 5"):
        encoder.encode(record)


def test_tools_render_their_schemas_and_the_tool_call_is_trained(tmp_path):
    tok = load("qwen3")
    (record,) = _records(tmp_path, TOOL_USE)
    messages = record["messages"]
    assert messages[1]["content"] == ""  # null content beside tool calls
    rows = ChatEncoder(tok, max_len=4096).encode(record)
    assert len(rows) == 2
    for ex, i in zip(rows, (1, 3)):
        prompt, turn = _at_generation(tok, messages, i, tools=[WEATHER])
        ((a, _),) = true_spans(ex.mask)
        assert (_decode(tok, ex.tokens[:a]), _decode(tok, ex.tokens[a:])) == (prompt, turn)
        prompt_side = _decode(tok, ex.tokens[:a])
        assert "# Tools" in prompt_side and json.dumps(WEATHER) in prompt_side
    call = _decode(tok, rows[0].tokens[rows[0].mask])
    assert call == (
        '\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>" + END
    )
    assert tok.convert_tokens_to_ids("<tool_call>") in rows[0].tokens[rows[0].mask].tolist()
    answer_prompt = _decode(tok, rows[1].tokens[~rows[1].mask])
    assert '<tool_response>\n{"rain": true, "temp": 12}\n</tool_response>' in answer_prompt
    assert _decode(tok, rows[1].tokens[rows[1].mask]).endswith("Yes, it is raining (12 C)." + END)
    # The eval's generation prompt shows the tools too.
    assert json.dumps(WEATHER) in record_prompt(tok, record)


def test_rows_left_untrained_by_the_cut_are_dropped_and_counted(tmp_path, capsys):
    tok = load("qwen3")
    long_prompt = " ".join(["word"] * 80)
    records = _records(
        tmp_path,
        {"prompt": "Hi?", "completion": "Hello."},  # fits
        {"prompt": long_prompt, "completion": "Short."},  # nothing trained within 40 tokens
        {"prompt": "Count.", "completion": " ".join(["one"] * 60)},  # cut, still trained
    )
    examples, counts = encode_records(tok, records, max_len=41, what="d.jsonl")
    assert (counts.records, counts.rows, counts.cut, counts.dropped) == (3, 2, 1, 1)
    assert [len(ex.tokens) for ex in examples][1] == 41 and all(
        ex.mask[1:].any() for ex in examples
    )
    assert [ex.text["prompt"] for ex in examples] == ["Hi?", "Count."]
    err = capsys.readouterr().err.strip()
    assert err == (
        "note: d.jsonl: 3 records -> 2 rows, 2 assistant turns trained; 1 row cut to "
        "data.max_seq_len (40 tokens); 1 row dropped: nothing trained within data.max_seq_len (40)"
    )
    assert counts.summary() == {
        "records": 3,
        "rows": 2,
        "turns_trained": 2,
        "split_per_turn": 0,
        "rows_cut": 1,
        "rows_dropped": 1,
    }
    with pytest.raises(BadInput, match="no row keeps a trained token within data.max_seq_len"):
        encode_records(tok, records[1:2], max_len=41, what="d.jsonl")


def test_a_template_that_keeps_history_trains_the_tool_call_in_one_row(tmp_path):
    if not available("gemma4"):
        pytest.skip("no gemma4 fixture")
    tok = load("gemma4")  # renders tools, tool calls and tool turns, history unchanged
    (record,) = _records(tmp_path, TOOL_USE)
    (ex,) = ChatEncoder(tok, max_len=4096).encode(record)
    call, answer = (_decode(tok, ex.tokens[a:b]) for a, b in true_spans(ex.mask))
    assert "get_weather" in call and "Paris" in call and call.endswith("<turn|>")
    assert answer == "Yes, it is raining (12 C).<turn|>"
    assert "declaration:get_weather" in _decode(tok, ex.tokens[: true_spans(ex.mask)[0][0]])


def test_a_template_that_drops_tools_is_refused(tmp_path):
    tok = load("qwen2")  # the fixture's Qwen2 template has no tools branch
    (record,) = _records(tmp_path, TOOL_USE)
    with pytest.raises(BadInput, match="line 1: the chat template does not render the record's"):
        ChatEncoder(tok, max_len=4096).encode(record)
    calls_only = dict(TOOL_USE)
    del calls_only["tools"]
    (record,) = _records(tmp_path, calls_only)
    with pytest.raises(BadInput, match="does not render the tool calls of assistant turn 2"):
        ChatEncoder(tok, max_len=4096).encode(record)
    quickstart = load_tokenizer(ROOT / "data/quickstart/teacher")  # knows no tool role
    answered = {"messages": [TOOL_USE["messages"][0], *TOOL_USE["messages"][2:]]}
    (record,) = _records(tmp_path, answered)
    with pytest.raises(BadInput, match="does not render tool turns \\(message 2\\)"):
        ChatEncoder(quickstart, max_len=4096).encode(record)


def test_tool_use_needs_a_chat_template(tmp_path):
    tok = load("qwen3")
    (record,) = _records(tmp_path, TOOL_USE)
    saved = tok._tokenizer.chat_template
    tok._tokenizer.chat_template = None
    try:
        with pytest.raises(BadInput, match="line 1: tools and tool calls need a tokenizer with a"):
            ChatEncoder(tok, max_len=4096).encode(record)
    finally:
        tok._tokenizer.chat_template = saved


def test_a_qwen3_row_split_per_turn_decoded(tmp_path):
    """The closing note's example: each row as text, the trained part in [[ ]]."""
    tok = load("qwen3")
    (record,) = _records(tmp_path, {"messages": THINKING})
    rows = ChatEncoder(tok, max_len=4096).encode(record)
    shown = [bracketed(tok, ex) for ex in rows]
    for ex, text in zip(rows, shown):
        print(f"\nrow {ex.text['turn']}:\n{text}")
    assert shown[1].endswith(
        "<|im_start|>assistant\n<think>\n[[5 * 4 = 20.\n</think>\n\n20" + END + "]]"
    )
    assert "<|im_start|>assistant\n5<|im_end|>" in shown[1]  # turn 1 in history: no thoughts
