"""The real-tokenizer fixtures reproduce llama.cpp's ground-truth encodings of the originals."""

import pytest
from real_tokenizers import FACTS, NAMES, available, ground_truth, load


@pytest.mark.parametrize("name", NAMES)
def test_fixture_matches_ground_truth(name):
    if not available(name):
        pytest.skip(f"no {name} fixture")
    tok = load(name)  # through the project's loader, as the pipeline reads it
    cases = ground_truth(name)
    assert len(cases) >= 40
    wrong = [
        (text, want, got)
        for text, want in cases
        if (got := tok.encode(text, add_special_tokens=False)) != want
    ]
    assert not wrong, f"{len(wrong)}/{len(cases)} differ, first: {wrong[0]}"
    assert len(tok.get_vocab()) == FACTS[name]["vocab"]
    eot = FACTS[name]["end_of_turn"]
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        tokenize=False,
    )
    ids = tok.encode(rendered, add_special_tokens=False)
    assert tok.convert_tokens_to_ids(eot) in ids
