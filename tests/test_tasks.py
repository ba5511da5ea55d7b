"""The arithmetic task: solutions are correct, the checker is exact, the splits are disjoint."""

import json
import random
import re
from pathlib import Path

from mlx_distill.tasks import arithmetic, get_checker

ROOT = Path(__file__).resolve().parents[1]


def _final_equation(completion: str) -> tuple[int, str, int, int]:
    a, op, b, result = re.search(r"so (\d+)([+\-x])(\d+)=(-?\d+)", completion).groups()
    return int(a), op, int(b), int(result)


def test_worked_solutions_are_correct():
    rng = random.Random(random.randrange(1 << 30))
    for _ in range(3000):
        p = arithmetic.make_problem(rng)
        a, op, b, result = _final_equation(p["completion"])
        expected = {"+": a + b, "-": a - b, "x": a * b}[op]
        assert result == expected == int(p["answer"])
        assert str(a) in p["prompt"] and str(b) in p["prompt"]
        # Each column line writes the digit of the result at that column, lowest first.
        digits = re.findall(r"write (\d)", p["completion"])
        assert int("".join(reversed(digits))) == expected
        assert p["completion"].startswith(f"{a}{op}{b}:\n")


def test_checker_reads_the_stated_answer_only():
    check = get_checker("arithmetic")
    assert check("so 2+2=4\nAnswer: 4", "4")
    assert not check("so 2+2=4\nAnswer: 5", "4")
    assert not check("so 2+2=4", "4")
    assert not check("Answer: 44", "4")
    assert arithmetic.extract_answer("x\nAnswer: -12 and more") == "-12"


def test_generation_is_seeded():
    assert arithmetic.generate(20, 7) == arithmetic.generate(20, 7)
    assert arithmetic.generate(20, 7) != arithmetic.generate(20, 8)


def test_shipped_splits_are_disjoint_and_checkable():
    prompts = {}
    for split in ("train", "valid", "test"):
        rows = [json.loads(line) for line in (ROOT / f"data/quickstart/{split}.jsonl").open()]
        prompts[split] = {r["prompt"] for r in rows}
        assert all(arithmetic.check(r["completion"], r["answer"]) for r in rows)
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["valid"]
    assert not prompts["valid"] & prompts["test"]
