"""The whole pipeline on real tokenizers: `mlx-distill run` (tokenizer -> teacher -> cache ->
distill / baseline -> eval -> report, and the export) with a tiny random Qwen2 teacher and
student on Qwen2's tokenizer (151,646 ids, 151,936 embedding rows), and the same with Llama 3's
tokenizer and an untied Llama head. The data are `messages` rows with system prompts and
several turns. Checked: the cached training rows (what the KD student trains on) against the
chat template's own rendering, and the exported student, loaded by mlx-lm itself, answering a
training prompt and stopping at the end-of-turn token.
"""

import json
import sys
from pathlib import Path

import pytest
from real_tokenizers import FACTS, available, tokenizer_dir
from tiny import ROOT, true_spans

pytestmark = pytest.mark.slow  # pipeline_run: a whole `mlx-distill run` per tokenizer

# A handful of rows to overfit: system prompts, two assistant turns in one row, and a
# prompt/completion row (one user and one assistant turn). Each row's answers are one word, so
# a few full-batch steps learn them.
ROWS = [
    {
        "messages": [
            {"role": "system", "content": "One word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
            {"role": "user", "content": "Its largest city?"},
            {"role": "assistant", "content": "Paris"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Colours."},
            {"role": "user", "content": "Sky?"},
            {"role": "assistant", "content": "Blue"},
        ]
    },
    {"prompt": "Hot?", "completion": "Cold"},
]

# family -> (architecture, tied head, embedding rows)
FAMILIES = {
    "qwen2": ("qwen2", True, FACTS["qwen2"]["embedding_rows"]),
    "llama3": ("llama", False, FACTS["llama3"]["embedding_rows"]),
}


def _model(
    folder: Path,
    tok: Path,
    arch: str,
    tied: bool,
    rows: int,
    hidden: int,
    layers: int,
    norm_gain: float = 1.0,
):
    import mlx.core as mx

    from mlx_distill.models import build_model, save_model
    from mlx_distill.recipe import ModelConfig

    cfg = ModelConfig(
        arch=arch,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=2 * hidden,
        tie_embeddings=tied,
        max_position=128,
    )
    mx.random.seed(len(str(folder)) + hidden)
    model, config = build_model(cfg, rows)
    # A larger final-norm gain makes Adam's per-step change of the logits larger: a dozen
    # full-batch steps then learn the answers over 150k ids (at 1.0 it takes ~40).
    model.model.norm.weight = model.model.norm.weight * norm_gain
    return save_model(model, config, tok, folder)


def _recipe(tmp: Path, family: str) -> Path:
    arch, tied, rows = FAMILIES[family]
    tok = tokenizer_dir(family)
    teacher = _model(tmp / "teacher", tok, arch, tied, rows, hidden=32, layers=2)
    student = _model(tmp / "student", tok, arch, tied, rows, hidden=32, layers=1, norm_gain=4.0)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = {
        "name": family,
        "runs_dir": str(tmp / "runs"),
        "data": {"train": str(data), "test": str(data), "max_seq_len": 40},
        "tokenizer": {"path": str(tok)},
        "teacher": {"kind": "local", "path": str(teacher)},
        "cache": {"targets": "topk", "k": 8, "batch_size": 8},
        "student": {"init": "pretrained", "path": str(student)},
        "loss": {"kind": "forward_kl", "kd_weight": 0.5, "temperature": 1.0},
        "train": {"steps": 16, "batch_size": 3, "lr": 1e-2, "warmup": 5, "log_every": 8},
        "eval": {"num_examples": 3, "max_new_tokens": 6, "batch_size": 3},
    }
    path = tmp / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


def bracketed(tokenizer, tokens, mask) -> str:
    """The decoded row with special tokens visible and each trained span in [[ ]]."""
    out, at = [], 0
    for a, b in true_spans(mask):
        out.append(tokenizer.decode(tokens[at:a].tolist(), skip_special_tokens=False))
        out.append("[[" + tokenizer.decode(tokens[a:b].tolist(), skip_special_tokens=False) + "]]")
        at = b
    out.append(tokenizer.decode(tokens[at:].tolist(), skip_special_tokens=False))
    return "".join(out)


def _conversation(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    return [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["completion"]},
    ]


@pytest.fixture(scope="module", params=list(FAMILIES))
def pipeline_run(request, tmp_path_factory):
    family = request.param
    if not available(family):
        pytest.skip(f"no {family} fixture")
    monkeypatch = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp(family)
    recipe = _recipe(tmp, family)
    from mlx_distill import cli

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["mlx-distill", "run", str(recipe), "--json", "--no-progress"])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    monkeypatch.undo()
    assert code in (0, None)
    return family, tmp / "runs" / family


def test_trained_rows_are_the_assistant_turns_of_the_rendered_conversation(pipeline_run):
    from mlx_distill.cache import open_cache
    from mlx_distill.text.tokenizer import load_tokenizer

    family, run_dir = pipeline_run
    tok = load_tokenizer(run_dir / "tokenizer")
    end = FACTS[family]["end_of_turn"]
    end_id = tok.convert_tokens_to_ids(end)
    cache = open_cache(run_dir / "cache")
    assert len(cache) == len(ROWS)
    for i, record in enumerate(ROWS):
        row = cache.row(i)
        tokens, mask = row.tokens, row.mask.astype(bool)
        messages = _conversation(record)
        rendered = tok.apply_chat_template(messages, tokenize=False)
        text = tok.decode(tokens.tolist(), skip_special_tokens=False)
        # the row is the template's rendering, cut after the last answer's end-of-turn token
        last = messages[-1]["content"] + end
        assert text == rendered[: rendered.rindex(last) + len(last)]
        spans = true_spans(mask)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [tok.decode(tokens[a:b].tolist(), skip_special_tokens=False) for a, b in spans] == [
            a + end for a in answers
        ]
        assert all(tokens[b - 1] == end_id for _, b in spans)
        if i == 0 and family == "qwen2":
            print(f"\n{family} row {i}: {bracketed(tok, tokens, mask)!r}")


def test_exported_student_answers_and_stops_at_the_end_of_turn(pipeline_run):
    from mlx_lm import load, stream_generate

    family, run_dir = pipeline_run
    model, tok = load(str(run_dir / "student"))  # mlx-lm's own loader, not the project's
    end_id = tok.convert_tokens_to_ids(FACTS[family]["end_of_turn"])
    assert end_id in tok.eos_token_ids
    config = json.loads((run_dir / "student" / "config.json").read_text())
    assert config["vocab_size"] == FAMILIES[family][2]
    solved = 0
    for record in ROWS:
        messages = _conversation(record)
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        ids = tok.encode(prompt, add_special_tokens=False)
        out = list(stream_generate(model, tok, ids, max_tokens=6))
        text = "".join(r.text for r in out)
        if text == messages[-1]["content"] and out[-1].finish_reason == "stop":
            assert out[-1].token == end_id
            solved += 1
    assert solved == len(ROWS)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    samples = results["models"]["student"]["samples"]
    assert all(s["stopped"] for s in samples), samples
    end = FACTS[family]["end_of_turn"]
    assert [s["output"] for s in samples] == [_conversation(r)[-1]["content"] + end for r in ROWS]
