"""Records the chat encoder cannot encode are refused before any work: one line naming the data
file and line, exit 2, the run directory as it was (or not created at all)."""

import json
import shutil
from pathlib import Path

import pytest
from tiny import ROOT, main, one_line, quickstart_sets, tree

QUICKSTART_TOK = ROOT / "data/quickstart/teacher"
SYSTEM_ROW = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": "3"},
    ]
}


def _no_system_template(tmp_path: Path) -> Path:
    """The quickstart model folder with a template that rejects a system turn (as Gemma 2's)."""
    folder = shutil.copytree(QUICKSTART_TOK, tmp_path / "no-system")
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + template
    )
    return folder


def _data(tmp_path: Path, *rows) -> Path:
    path = tmp_path / "train.jsonl"
    good = (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:2]
    path.write_text("\n".join([*good, *(json.dumps(r) for r in rows)]) + "\n")
    return path


def test_a_template_that_rejects_a_record_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    folder = _no_system_template(tmp_path)
    data = _data(tmp_path, SYSTEM_ROW)
    runs = tmp_path / "runs"
    extra = (f"tokenizer.path={folder}", f"teacher.path={folder}", f"data.train={data}")
    code, _, err = main(
        monkeypatch, capsys, "run", "recipes/quickstart.yaml", *quickstart_sets(runs, *extra)
    )
    assert one_line(code, err) == (
        f"error: {data} line 3: the tokenizer's chat template cannot render it: System role not "
        f"supported (chat template of the tokenizer in {folder})"
    )
    assert not runs.exists()


def test_a_template_that_drops_a_records_tools_is_refused_before_any_work(
    monkeypatch, capsys, tmp_path
):
    # The quickstart's template has no tools branch: the student would learn tool calls blind.
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    data = _data(tmp_path, dict(SYSTEM_ROW, tools=[tool]))
    runs = tmp_path / "runs"
    code, _, err = main(
        monkeypatch,
        capsys,
        "run",
        "recipes/quickstart.yaml",
        *quickstart_sets(runs, f"data.train={data}"),
    )
    assert one_line(code, err) == (
        f"error: {data} line 3: the chat template does not render the record's tools ('add' is "
        "missing from its text); use a template that renders tools (chat template of the "
        "tokenizer in data/quickstart/teacher)"
    )
    assert not runs.exists()


def test_the_teachers_own_template_is_checked_on_the_test_split(monkeypatch, capsys, tmp_path):
    # Same vocabulary as the recipe's tokenizer, another template: eval renders the test split
    # with the teacher's own.
    folder = _no_system_template(tmp_path)
    test = _data(tmp_path, SYSTEM_ROW)
    runs = tmp_path / "runs"
    run_dir = runs / "quickstart"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("kept as it is")
    before = tree(run_dir)
    extra = (f"teacher.path={folder}", f"data.test={test}")
    code, _, err = main(
        monkeypatch,
        capsys,
        "run",
        "recipes/quickstart.yaml",
        *quickstart_sets(runs, *extra),
        "--stage",
        "eval",
    )
    assert one_line(code, err) == (
        f"error: {test} line 3: the tokenizer's chat template cannot render it: System role not "
        f"supported (chat template of the tokenizer in {folder})"
    )
    assert tree(run_dir) == before


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {
                "messages": [
                    {"role": "function", "content": "{}"},
                    {"role": "assistant", "content": "3"},
                ]
            },
            "message 1 has role 'function'; roles are system, user, assistant, tool",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "1 + 2?"},
                    {"role": "assistant", "content": None, "tool_calls": {"name": "add"}},
                ]
            },
            "message 2: tool_calls must be a non-empty list",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "1 + 2?"},
                    {"role": "assistant", "tool_calls": [{"function": {"name": "add"}}]},
                ]
            },
            "message 2 tool call 1: arguments must be an object or a JSON string",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "1 + 2?"},
                    {"role": "assistant", "content": "3", "reasoning_content": ["add"]},
                ]
            },
            "message 2: reasoning_content must be a string",
        ),
        (
            {"tools": {"name": "add"}, "prompt": "1 + 2?", "completion": "3"},
            "tools must be a non-empty list of function schemas",
        ),
        (
            {"messages": [{"role": "system", "content": "Hi."}, {"role": "user", "content": "1?"}]},
            "messages have no assistant turn to train on",
        ),
    ],
)
def test_bad_messages_rows_are_refused_with_file_and_line(
    row, message, monkeypatch, capsys, tmp_path
):
    data = _data(tmp_path, SYSTEM_ROW, row)
    runs = tmp_path / "runs"
    code, _, err = main(
        monkeypatch,
        capsys,
        "run",
        "recipes/quickstart.yaml",
        *quickstart_sets(runs, f"data.train={data}"),
    )
    assert one_line(code, err) == f"error: {data} line 4: {message}"
    assert not runs.exists()
