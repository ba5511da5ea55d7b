"""Arithmetic word problems with worked, column-by-column solutions.

The quickstart's task: small enough for a few-million-parameter teacher to solve reliably after
minutes of CPU training, hard enough that a smaller student trained briefly does not. Problems
are one step (add, subtract, multiply by a digit) with varied phrasings; each solution
works every column with its carry or borrow, then states `Answer: N`, which the checker reads.
"""

from __future__ import annotations

import random
import re

NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Eva",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
    "Uma",
    "Victor",
]
ITEMS = [
    "apples",
    "stickers",
    "marbles",
    "coins",
    "books",
    "pencils",
    "stamps",
    "shells",
    "cards",
    "beads",
    "cookies",
    "tickets",
    "seeds",
    "bricks",
    "buttons",
    "candles",
]

START = [
    "{name} has {a} {item}.",
    "{name} had {a} {item}.",
    "A box holds {a} {item}.",
    "{name} owns {a} {item}.",
]
ADD = [
    "{name} buys {b} more.",
    "A friend gives {name} {b} more.",
    "{name} finds {b} more.",
    "{name} gets {b} more.",
]
SUB = [
    "{name} gives away {b}.",
    "{name} sells {b}.",
    "{name} loses {b}.",
    "{name} uses {b}.",
]
MUL = [
    "{name} has {b} bags of {a} {item}.",
    "There are {b} boxes of {a} {item}.",
    "{name} packs {b} rows of {a} {item}.",
]
QUESTION = [
    "How many {item} now?",
    "How many {item} are there now?",
    "How many {item} are left?",
]
QUESTION_MUL = [
    "How many {item} in total?",
    "How many {item} in all?",
]


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def _add_steps(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    lines, carry = [f"{a}+{b}:"], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        expr = f"{x}+{y}" + (f"+{carry}" if carry else "")
        lines.append(f"{expr}={s} write {s % 10} carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append("write 1")
    lines.append(f"so {a}+{b}={a + b}")
    return lines


def _sub_steps(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    lines, borrow = [f"{a}-{b}:"], 0
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else 0)
        top = f"{x}-1" if borrow else f"{x}"
        x -= borrow
        if x < y:
            lines.append(f"{top}<{y} borrow 10: {x + 10}-{y}={x + 10 - y} write {x + 10 - y}")
            borrow = 1
        else:
            lines.append(f"{top}-{y}={x - y} write {x - y}")
            borrow = 0
    lines.append(f"so {a}-{b}={a - b}")
    return lines


def _mul_steps(a: int, b: int) -> list[str]:
    lines, carry = [f"{a}x{b}:"], 0
    for x in _digits(a):
        p = x * b + carry
        expr = f"{x}x{b}={x * b}" + (f" +{carry}={p}" if carry else "")
        lines.append(f"{expr} write {p % 10} carry {p // 10}")
        carry = p // 10
    if carry:
        lines.append(f"write {carry}")
    lines.append(f"so {a}x{b}={a * b}")
    return lines


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def make_problem(rng: random.Random) -> dict:
    """One problem: {'prompt', 'completion', 'answer'}.

    Add and subtract mix 2- and 3-digit numbers (so difficulty is graded); multiply is
    2-digit x 1-digit. Solutions are deterministic: one wording per step.
    """
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choices(["add", "sub", "mul"], weights=[4, 4, 2])[0]
    fmt = {"name": name, "item": item}
    if kind == "mul":
        a, b = rng.randint(12, 99), rng.randint(2, 9)
        text = [rng.choice(MUL).format(a=a, b=b, **fmt), rng.choice(QUESTION_MUL).format(**fmt)]
        steps, answer = _mul_steps(a, b), a * b
    elif kind == "add":
        a, b = _number(rng, rng.choice([2, 3])), _number(rng, rng.choice([2, 3]))
        text = [
            rng.choice(START).format(a=a, **fmt),
            rng.choice(ADD).format(b=b, **fmt),
            rng.choice(QUESTION[:2]).format(**fmt),
        ]
        steps, answer = _add_steps(a, b), a + b
    else:
        a = _number(rng, rng.choice([2, 3]))
        b = rng.randint(10, a)
        text = [
            rng.choice(START).format(a=a, **fmt),
            rng.choice(SUB).format(b=b, **fmt),
            rng.choice(QUESTION).format(**fmt),
        ]
        steps, answer = _sub_steps(a, b), a - b
    completion = "\n".join(steps + [f"Answer: {answer}"])
    return {"prompt": " ".join(text), "completion": completion, "answer": str(answer)}


def generate(n: int, seed: int) -> list[dict]:
    """n problems from a seeded generator (the same seed gives the same problems)."""
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


def extract_answer(text: str) -> str | None:
    """The number after the first `Answer:`, or None."""
    match = _ANSWER.search(text)
    return match.group(1) if match else None


def check(completion: str, answer: str) -> bool:
    """Exact match of the stated answer."""
    return extract_answer(completion) == str(answer).strip()


def write_splits(out_dir: str, sizes: dict[str, int], seed: int) -> None:
    """Write {split}.jsonl files with disjoint problems (a problem's prompt appears once)."""
    from mlx_distill.text.data import write_jsonl

    rng = random.Random(seed)
    seen: set[str] = set()
    for split, n in sizes.items():
        rows: list[dict] = []
        while len(rows) < n:
            problem = make_problem(rng)
            if problem["prompt"] not in seen:
                seen.add(problem["prompt"])
                rows.append(problem)
        write_jsonl(f"{out_dir}/{split}.jsonl", rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the quickstart task's data splits.")
    parser.add_argument("--out", default="data/quickstart")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--valid", type=int, default=500)
    parser.add_argument("--test", type=int, default=500)
    args = parser.parse_args()
    write_splits(args.out, {"train": args.train, "valid": args.valid, "test": args.test}, args.seed)
