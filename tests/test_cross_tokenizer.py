"""A local teacher with another tokenizer (teachers/cross.py), on real tokenizers.

Checked: with a shared vocabulary the aligned path reproduces the direct token targets (the
invariant: alignment loses only candidates that are no whole character); a Llama 3 teacher's
candidates land on Qwen2 student tokens whose text is the candidate's, over most answer
positions; a character split over byte pieces is one teacher step with the joint log-prob; the
recipe checks refuse what cross-tokenizer distillation cannot do, in one line; and a whole run
(`mlx-distill run`): a Llama-3-tokenizer teacher that learned the answers writes them itself
(`teacher.answers: generate`), a Qwen2-tokenizer student trains on them with aligned KD targets
and answers the prompts.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from real_tokenizers import FACTS, available, load, tokenizer_dir
from test_real_pipeline import ROWS, _conversation, _model
from tiny import ROOT, one_line, true_spans

pytestmark = pytest.mark.skipif(
    not (available("qwen2") and available("llama3")), reason="no Qwen2/Llama 3 fixtures"
)

PAIRS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris, about 2.1 million."),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Photosynthesis?"},
        ],
        "Plants turn light, water and CO₂ into sugar — and oxygen. 光合作用!",
    ),
    (
        [{"role": "user", "content": "Code?"}],
        "def add(a, b):\n    return a + b  # 42 ✓",
    ),
]


def _teacher(tmp, family: str, seed: int):
    from mlx_distill.teachers.local import LocalTeacher

    arch, tied = ("qwen2", True) if family == "qwen2" else ("llama", False)
    rows = FACTS[family]["embedding_rows"]
    folder = tmp / f"{family}-{seed}"
    _model(folder, tokenizer_dir(family), arch, tied, rows, hidden=32 + 8 * (seed % 3), layers=1)
    return LocalTeacher(folder)


def _entries(targets):
    """RowTargets -> [(ids, logprobs)] per position."""
    cuts = np.cumsum(targets.counts)[:-1]
    return list(zip(np.split(targets.ids, cuts), np.split(targets.logprobs, cuts)))


def test_shared_vocabulary_alignment_reproduces_the_direct_targets(tmp_path):
    """The invariant: a Qwen2 teacher aligned to a Qwen2 student by text gives, at every
    position whose next token is a whole character, the teacher's own top-k entries, less those
    with no text of their own (special tokens, byte pieces); the end of turn exactly."""
    from mlx_distill.teachers import cross

    seed = int(np.random.default_rng().integers(0, 1000))
    teacher = _teacher(tmp_path, "qwen2", seed)
    tok = load("qwen2")
    rows, counts = cross.student_rows(tok, PAIRS, max_len=256, what="t")
    assert len(rows) == len(PAIRS) and counts["rewritten"] == counts["dropped"] == 0
    aligned = cross.CrossTeacher(teacher, rows, tok, k=8, temperature=1.0)
    got = aligned.score(None, row_ids=list(range(len(rows))))
    want = teacher.score([r.example for r in rows], targets="topk", k=8)
    strings = aligned.student_strings
    whole = 0
    for row, g, w in zip(rows, got, want):
        positions = np.flatnonzero(row.example.mask[1:])
        for p, (gi, gl), (wi, wl) in zip(positions, _entries(g), _entries(w)):
            label = int(row.example.tokens[p + 1])
            if row.spans[p + 1][0] < row.spans[p][1]:
                assert len(gi) == 0  # inside a character: no teacher step starts there
                continue
            whole += 1
            have = dict(zip(gi.tolist(), gl.tolist()))
            kept = [(i, lp) for i, lp in zip(wi.tolist(), wl.tolist()) if strings[i]]
            if label == aligned.student_end:  # the teacher's own end of turn maps to it
                kept = list(zip(wi.tolist(), wl.tolist()))
            for i, lp in kept:
                assert abs(have.pop(i) - lp) < 1e-5, (seed, p, i)
            assert set(have) <= {label}, (seed, p, have)  # at most the chosen token added
    assert whole >= 40
    cov = aligned.coverage()
    assert cov["position_fraction"] > 0.9


def test_llama3_candidates_land_on_qwen2_tokens_of_the_same_text(tmp_path):
    from mlx_distill.teachers import cross

    teacher = _teacher(tmp_path, "llama3", int(np.random.default_rng().integers(0, 1000)))
    tok = load("qwen2")
    rows, _ = cross.student_rows(tok, PAIRS, max_len=256, what="t")
    aligned = cross.CrossTeacher(teacher, rows, tok, k=8, temperature=1.0)
    got = aligned.score(None, row_ids=list(range(len(rows))))
    llama_texts = {s for s in aligned.teacher_strings if s}
    for row, targets in zip(rows, got):
        positions = np.flatnonzero(row.example.mask[1:])
        for ids, lps in _entries(targets):
            for i in ids.tolist():
                text = aligned.student_strings[i]
                # every target is a Qwen2 token whose text a Llama 3 token spells, or the end
                assert i == aligned.student_end or text in llama_texts or text in row.answer
            assert np.all(np.diff(lps) <= 0)  # sorted, best first
        end = positions[-1]  # the end-of-turn position has the teacher's targets after the answer
        assert row.example.tokens[end + 1] == aligned.student_end
        assert len(_entries(targets)[-1][0]) > 0
    cov = aligned.coverage()
    print(f"\nLlama 3 -> Qwen2 coverage on {len(rows)} answers: {cov}")
    assert cov["positions"] > 40 and cov["position_fraction"] > 0.85
    assert 0 < cov["mass_fraction"] <= 1


def test_a_character_split_over_byte_pieces_is_one_step_with_the_joint_logprob():
    from mlx_distill.teachers import cross
    from mlx_distill.teachers.align import encode_offsets, piece_strings

    tok = load("llama3")
    answer = "CO₂ 光合作用 🦙 龘 ✓ ok"
    ids, spans = encode_offsets(tok, answer)
    rng = np.random.default_rng()
    chosen = -rng.random(len(ids)).astype(np.float32)
    cand = rng.integers(0, 1000, (len(ids), 4))
    lps = np.sort(-rng.random((len(ids), 4)), axis=1)[:, ::-1]
    steps = cross.teacher_steps(answer, spans, chosen, cand, lps, piece_strings(tok))
    assert "".join(s[0] for s in steps) == answer
    assert len(steps) < len(ids)  # some characters took several byte pieces
    assert abs(sum(s[1] for s in steps) - float(chosen.sum())) < 1e-4
    assert all(s[0] for s in steps)


def _recipe(tmp, teacher, student_tokenizer="qwen2", **extra) -> dict:
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    student = _model(
        tmp / "student", tokenizer_dir(student_tokenizer), "qwen2", True,
        FACTS["qwen2"]["embedding_rows"], hidden=32, layers=1, norm_gain=4.0,
    )  # fmt: skip
    recipe = {
        "name": "cross",
        "runs_dir": str(tmp / "runs"),
        "data": {"train": str(data), "test": str(data), "max_seq_len": 40},
        "tokenizer": {"path": str(tokenizer_dir(student_tokenizer))},
        "teacher": {"kind": "local", "path": str(teacher)},
        "cache": {"targets": "topk", "k": 8, "batch_size": 8},
        "student": {"init": "pretrained", "path": str(student)},
        "loss": {"kind": "forward_kl", "kd_weight": 0.5, "temperature": 1.0},
        "train": {"steps": 16, "batch_size": 3, "lr": 1e-2, "warmup": 5, "log_every": 8},
        "eval": {"num_examples": 3, "max_new_tokens": 6, "batch_size": 3},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        recipe.setdefault(section, {})[key] = value
    return recipe


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"distill__mode": "on_policy"}, "cross-tokenizer distillation is offline only"),
        ({"cache__targets": "sample"}, "set cache.targets: topk"),
        ({"student__init": "teacher_layers"}, "copies the teacher's embeddings"),
    ],
)
def test_what_cross_tokenizer_distillation_cannot_do_is_refused_in_one_line(
    tmp_path, monkeypatch, capsys, extra, message
):
    from tiny import main

    teacher = _model(tmp_path / "teacher", tokenizer_dir("llama3"), "llama", False, 128256, 32, 1)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_recipe(tmp_path, teacher, **extra)))
    code, _, err = main(monkeypatch, capsys, "run", str(recipe), "--no-progress")
    assert message in one_line(code, err)
    assert not (tmp_path / "runs" / "cross").exists()


def _trained_llama_teacher(tmp):
    """A tiny Llama-3-tokenizer model trained on ROWS until it answers them."""
    from tiny import train_run

    from mlx_distill.cache.loader import Loader
    from mlx_distill.models import load_model, save_model
    from mlx_distill.recipe import TrainConfig
    from mlx_distill.text.chat import encode_records

    tok_dir = tokenizer_dir("llama3")
    start = _model(tmp / "teacher0", tok_dir, "llama", False, 128256, 32, 1, norm_gain=4.0)
    model, tok, config = load_model(start)
    examples, _ = encode_records(tok, ROWS, max_len=41)
    cfg = TrainConfig(steps=20, batch_size=3, lr=1e-2, warmup=5, log_every=10)
    train_run(tmp, model, Loader(examples, batch_size=3, seq_len=40, seed=0), cfg, None, "t")
    return save_model(model, config, tok_dir, tmp / "teacher")


@pytest.mark.slow
def test_a_llama3_teacher_distills_into_a_qwen2_student(tmp_path):
    from mlx_lm import load as mlx_load
    from mlx_lm import stream_generate

    from mlx_distill import cli
    from mlx_distill.cache import open_cache
    from mlx_distill.text.tokenizer import load_tokenizer

    teacher = _trained_llama_teacher(tmp_path)
    recipe = tmp_path / "recipe.json"
    gen = {"max_tokens": 8, "temperature": 0.0, "top_p": 0.0, "batch_size": 4}
    spec = _recipe(tmp_path, teacher, teacher__answers="generate", teacher__generation=gen)
    recipe.write_text(json.dumps(spec))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["mlx-distill", "run", str(recipe), "--no-progress"])
    try:
        cli.main()
    except SystemExit as e:
        assert e.code in (0, None)
    finally:
        monkeypatch.undo()
    run = tmp_path / "runs" / "cross"
    # the teacher wrote each answer itself, and they are the data's (it learned them)
    teach = json.loads((run / "teacher" / "stage.json").read_text())["result"]
    assert teach["answers"]["answered"] == len(ROWS) and teach["answers"]["cut_off"] == 0
    cache_stage = json.loads((run / "cache" / "stage.json").read_text())["result"]
    cov = cache_stage["coverage"]
    assert cov["positions"] > 0 and cov["position_fraction"] == 1.0
    # the student's rows: its own template's rendering, the teacher's answers trained
    tok = load_tokenizer(run / "tokenizer")
    cache = open_cache(run / "cache")
    end = FACTS["qwen2"]["end_of_turn"]
    for i, record in enumerate(ROWS):
        row = cache.row(i)
        tokens = row.tokens
        spans = true_spans(row.mask.astype(bool))
        trained = [tok.decode(tokens[a:b].tolist(), skip_special_tokens=False) for a, b in spans]
        assert trained == [_conversation(record)[-1]["content"] + end]
        assert row.counts[-1] > 0  # the end of turn carries the teacher's targets
    # the KD student learned them from the Llama 3 teacher's targets: it answers and stops
    model, stok = mlx_load(str(run / "student"))
    for record in ROWS:
        messages = _conversation(record)
        prompt = stok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        out = list(
            stream_generate(
                model, stok, stok.encode(prompt, add_special_tokens=False), max_tokens=6
            )
        )
        assert "".join(r.text for r in out) == messages[-1]["content"]
    results = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert "top1_agreement" not in results["student"]  # token comparisons need one vocabulary
    assert results["teacher"]["perplexity"] > 0


def test_tool_use_with_a_cross_tokenizer_teacher_is_refused_before_any_write(
    tmp_path, monkeypatch, capsys
):
    from tiny import main

    teacher = _model(tmp_path / "teacher", tokenizer_dir("llama3"), "llama", False, 128256, 32, 1)
    spec = _recipe(tmp_path, teacher, "qwen3")  # Qwen3's template renders tools
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    rows = ROWS + [
        {
            "tools": tools,
            "messages": [
                {"role": "user", "content": "1 + 2?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
            ],
        }
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec["data"]["test"] = str(tmp_path / "test.jsonl")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(spec))
    code, _, err = main(monkeypatch, capsys, "run", str(recipe), "--no-progress")
    line = one_line(code, err)
    assert "train.jsonl record 4: tool use" in line
    assert not (tmp_path / "runs" / "cross").exists()
