"""Coverage of Gemini log-prob targets on real student tokenizers (Gemma 4 and Qwen2 fixtures).

The fake teacher tokenizes its answers with the Gemma vocabulary and reports its ids as
`tokenId`s, as Gemini 2.x/3 do with the Gemma vocabulary. A Gemma student must then get the
exact id mapping (checked on token strings) and nearly every answer position covered; a Qwen2
student gets the string alignment and less.
"""

from __future__ import annotations

import json

import pytest
from fake_gemini import FakeGemini
from real_tokenizers import available, load

from mlx_distill.recipe import load_recipe
from mlx_distill.teachers.align import _hf, _raw_piece_strings, records_to_examples
from mlx_distill.teachers.gemini import run_gemini_teacher

ANSWERS = [
    "The train leaves at 3 pm and arrives two hours later, so it arrives at 5 pm.",
    "Adding the apples gives 12, and sharing them among 4 friends leaves 3 each.",
    "First multiply 7 by 6 to get 42; then subtract 2, which gives the answer 40.",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures higher up.",
    "The longest side is the hypotenuse: its square is 9 plus 16, so it is 5 units long.",
    "If every cat has four legs and there are three cats, there are twelve legs in all.",
]


def gemma_teacher():
    """(tokenize, token_id) for the fake: Gemma pieces and ids, as Gemini would send them."""
    tok = load("gemma4")
    strings = _raw_piece_strings(tok)[0]
    lookup: dict[str, int] = {}
    for i, s in enumerate(strings):
        if s:
            lookup.setdefault(s, i)

    def tokenize(text: str) -> list[str]:
        ids = _hf(tok)(text, add_special_tokens=False)["input_ids"]
        pieces = [strings[i] or "" for i in ids]
        assert "".join(pieces) == text
        return pieces

    return tokenize, lookup.get


@pytest.mark.slow
@pytest.mark.skipif(
    not (available("gemma4") and available("qwen2")), reason="tokenizer fixtures absent"
)
def test_coverage_on_gemma_and_qwen2_students(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    tokenize, token_id = gemma_teacher()
    prompts = [{"prompt": f"Question {i} [ans={a}]"} for i, a in enumerate(ANSWERS)]
    out = tmp_path / "records"
    with FakeGemini(key="test-key", tokenize=tokenize, token_id=token_id) as fake:
        sets = [f"teacher.gemini.base_url={fake.base_url}", "teacher.gemini.logprobs=8"]
        run_gemini_teacher(load_recipe(None, sets), prompts, out, progress=False)
    found = {}
    for name in ("gemma4", "qwen2"):
        examples, targets, coverage = records_to_examples(out, load(name), k=9)
        assert len(examples) == len(ANSWERS) and coverage["with_logprobs"] == len(ANSWERS)
        found[name] = coverage
    print(json.dumps(found, indent=1))  # the measurement quoted in the README
    gemma, qwen = found["gemma4"], found["qwen2"]
    assert gemma["exact_ids"] and gemma["ids_agree"] == gemma["ids_checked"] > 0
    assert not qwen["exact_ids"]  # Qwen2 ids are another vocabulary: strings, not ids
    assert gemma["position_fraction"] > 0.9
    assert 0.3 < qwen["position_fraction"] < gemma["position_fraction"]
    assert 0 < qwen["mass_fraction"] < gemma["mass_fraction"] <= gemma["position_fraction"]
