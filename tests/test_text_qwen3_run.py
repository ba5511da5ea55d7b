"""`mlx-distill run` (tokenizer -> teacher -> cache -> baseline) on a Qwen3-template dataset with
thinking turns, tool use and a row the cut leaves untrained: the cache (what the KD student
trains on) holds one row per assistant turn, exactly the rows the baseline trains on, and the
stage summaries count records, rows and trained turns."""

import json
import sys

import pytest
from real_tokenizers import FACTS, available, tokenizer_dir
from test_real_pipeline import _model as real_model
from test_text_qwen3 import THINKING, TOOL_USE
from tiny import ROOT

pytestmark = pytest.mark.skipif(not available("qwen3"), reason="no qwen3 fixture")

ROWS = [
    {"messages": THINKING},  # 3 assistant turns: 3 rows
    TOOL_USE,  # the tool call and the answer: 2 rows
    {"prompt": " ".join(["word"] * 300), "completion": "Short."},  # nothing trained within 256
    {"prompt": "Hi?", "completion": "Hello."},  # 1 row
]


def _model(folder, tok, layers: int):
    """A tiny random Qwen2-architecture model on the Qwen3 tokenizer's embedding rows."""
    return real_model(folder, tok, "qwen2", True, FACTS["qwen3"]["embedding_rows"], 16, layers)


def test_cache_and_baseline_train_every_turn_of_a_qwen3_dataset(tmp_path, monkeypatch, capsys):
    from mlx_distill import cli
    from mlx_distill.cache import open_cache
    from mlx_distill.text.chat import encode_records
    from mlx_distill.text.data import read_jsonl
    from mlx_distill.text.tokenizer import load_tokenizer

    tok = tokenizer_dir("qwen3")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = {
        "name": "qwen3",
        "runs_dir": str(tmp_path / "runs"),
        "stages": ["tokenizer", "teacher", "cache", "baseline"],
        "data": {"train": str(data), "max_seq_len": 256},
        "tokenizer": {"path": str(tok)},
        "teacher": {"kind": "local", "path": str(_model(tmp_path / "teacher", tok, 2))},
        "cache": {"targets": "topk", "k": 4, "batch_size": 4},
        "student": {"init": "pretrained", "path": str(_model(tmp_path / "student", tok, 1))},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup": 1, "log_every": 1},
    }
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["mlx-distill", "run", str(path), "--json", "--no-progress"])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, None), err
    run_dir = tmp_path / "runs" / "qwen3"
    want = {
        "records": 4,
        "rows": 6,
        "turns_trained": 6,
        "split_per_turn": 2,
        "rows_cut": 0,
        "rows_dropped": 1,
    }
    for stage in ("cache", "baseline"):
        summary = json.loads((run_dir / stage / "stage.json").read_text())
        assert summary["result"]["data"] == want, summary
    note = (
        f"note: {data}: 4 records -> 6 rows, 6 assistant turns trained (2 conversations split "
        "per turn: the chat template renders earlier turns differently); 1 row dropped: nothing "
        "trained within data.max_seq_len (256)"
    )
    assert err.count(note) == 2  # the cache stage and the baseline, each in one line
    # The KD student's rows (the cache) are the baseline's rows, one per assistant turn.
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    rows, _ = encode_records(tokenizer, read_jsonl(data), max_len=257)
    cache = open_cache(run_dir / "cache")
    assert len(cache) == len(rows) == 6
    for i, ex in enumerate(rows):
        cached = cache.row(i)
        assert cached.tokens.tolist() == ex.tokens.tolist()
        assert cached.mask.astype(bool).tolist() == ex.mask.tolist()
    assert [cache.example(i).text.get("turn") for i in range(6)] == [1, 2, 3, 1, 2, None]
