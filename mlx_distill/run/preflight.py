"""Every input a run reads, checked before any stage writes: one line per problem, exit 2.

Data files (UTF-8, JSONL shape, with the line), tokenizer folders (JSON files, loading, chat
template), model folders (config.json, safetensors weights, an architecture whose head contract
holds on a probe: `models.check_folder`) and the tokenizer agreement between
student, teacher and `tokenizer.path`: token-level targets need one vocabulary, and a student's
weights only make sense with the tokenizer they were trained with (its own folder for
`student.init: pretrained`, the teacher's for `teacher_layers`). In a distributed group, what
the group can run data-parallel (`check_group`).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_distill.errors import BadInput
from mlx_distill.models import check_folder, check_teacher_layers
from mlx_distill.recipe import STAGES, Recipe
from mlx_distill.run.table import TABLE
from mlx_distill.text.chat import ChatEncoder, record_messages, record_shape
from mlx_distill.text.data import read_jsonl
from mlx_distill.text.tokenizer import already_loaded, load_tokenizer, vocab_hash
from mlx_distill.train.distributed import check_batch
from mlx_distill.train.onpolicy import check_templates


def check_inputs(recipe: Recipe, stages: list[str]) -> None:
    """Raise BadInput for the first bad input that the `stages` about to run would read."""
    selected = set(stages)
    records = {}
    for split in ("train", "valid", "test"):
        users = {s for s in STAGES if split in TABLE[s].reads}
        if not users & selected:
            continue
        value = getattr(recipe.data, split)
        if value is None:
            if split == "valid":
                continue  # optional
            used_by = ", ".join(s for s in STAGES if s in users & selected)
            raise BadInput(f"recipe key data.{split}: not set (the {used_by} stage reads it)")
        records[split] = check_data_file(f"data.{split}", Path(value))
    if any(TABLE[s].reads for s in selected):  # every stage that reads data encodes it
        check_tokenizers(recipe, selected)
        check_renders(recipe, selected, records)


def check_renders(recipe: Recipe, selected: set[str], records: dict[str, list]) -> None:
    """Every split renders with the chat template of each tokenizer that will encode it.

    The recipe's tokenizer encodes every split; a local teacher's own folder encodes the test
    split too (the eval stage scores the teacher with its tokenizer). One record per distinct
    sequence of roles is rendered, the way the encoder does (prefix by prefix): what a
    template checks (a system turn it rejects, alternating roles) depends on those. A trained
    SentencePiece tokenizer uses the project's own template, which renders every known role.
    """
    if not recipe.tokenizer.path:
        return
    folders = {split: [recipe.tokenizer.path] for split in records}
    teacher_dir = recipe.teacher.path if recipe.teacher.kind == "local" else None
    if teacher_dir and "eval" in selected and "test" in folders:
        folders["test"].append(teacher_dir)
    for split, rows in records.items():
        for folder in dict.fromkeys(folders[split]):
            _render_each_shape(load_tokenizer(folder), rows, recipe.data.train_on, folder)


def _render_each_shape(tokenizer, records: list, train_on: str, folder: str) -> None:
    seen = set()
    try:
        encoder = ChatEncoder(tokenizer, max_len=1 << 30, train_on=train_on)
        for record in records:
            if record_shape(record) == "text":
                continue
            roles = tuple(m["role"] for m in record_messages(record))
            if roles not in seen:
                seen.add(roles)
                encoder.spans(record)  # a template error names the record's file and line
    except BadInput as e:
        raise BadInput(f"{e} (chat template of the tokenizer in {folder})") from None


def check_data_file(key: str, path: Path) -> list:
    """A JSONL data file: present, UTF-8 on every line, every record of a known shape.
    Returns its records."""
    if not path.is_file():
        raise BadInput(f"recipe key {key}: data file not found: {path}")
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadInput(
                    f"{path} line {lineno}: not UTF-8 (byte {line[e.start : e.start + 1]!r} at "
                    f"column {e.start + 1}); save the file as UTF-8"
                ) from None
    return read_jsonl(path)  # a malformed line fails here, naming file and line


def _json_file(path: Path) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} line {e.lineno}: invalid JSON: {e.msg}") from None


def check_tokenizer_folder(key: str, folder: Path):
    """Load the tokenizer in `folder` (named by recipe key `key`); returns it.

    Each JSON file is parsed first so a broken one is named with its line; a chat template that
    does not render is named with its file.
    """
    if not folder.is_dir():
        raise BadInput(f"recipe key {key}: folder not found: {folder}")
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    if not any((folder / n).is_file() for n in names[:2]):
        raise BadInput(f"recipe key {key}: no tokenizer files (tokenizer.json) in {folder}")
    if not already_loaded(folder):  # files that loaded before parse (a 150k tokenizer: ~0.5 s)
        for name in names:
            if (folder / name).is_file():
                _json_file(folder / name)
    try:
        tokenizer = load_tokenizer(folder)
    except BadInput:
        raise
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BadInput(
            f"recipe key {key}: cannot load the tokenizer in {folder}: {type(e).__name__}"
            + (f": {detail}" if detail else "")
        ) from None
    if getattr(tokenizer, "chat_template", None):
        source = "chat_template.jinja" if (folder / "chat_template.jinja").is_file() else None
        source = folder / (source or "tokenizer_config.json")
        try:
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}],
                tokenize=False,
            )
        except Exception as e:
            line = getattr(e, "lineno", None)
            where = f" line {line}" if line else ""
            message = getattr(e, "message", None) or str(e).splitlines()[0]
            raise BadInput(
                f"{source}{where}: the chat template does not render: {message}"
            ) from None
    return tokenizer


def check_model_folder(key: str, folder: Path):
    """An mlx-lm model folder: config.json (valid JSON), safetensors weights, a tokenizer."""
    if not folder.is_dir():
        raise BadInput(f"recipe key {key}: folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise BadInput(f"recipe key {key}: not an mlx-lm model folder (no config.json): {folder}")
    _json_file(folder / "config.json")
    check_architecture_folder(key, folder, weights=False)  # mlx-lm has the class (no probe yet)
    if not list(folder.glob("*.safetensors")):
        raise BadInput(
            f"recipe key {key}: no .safetensors weights in {folder} (weights are read only from "
            "safetensors files)"
        )
    return check_tokenizer_folder(key, folder)


def check_architecture_folder(key: str, folder: Path, weights: bool = True) -> None:
    """The model in `folder` (recipe key `key`) is one the fused loss reproduces: mlx-lm builds
    its architecture and the head contract holds on a probe (`models.check_folder`, proven
    once per folder content in this process, so the stage that loads it next does not probe
    again)."""
    try:
        check_folder(folder, weights)
    except BadInput as e:
        raise BadInput(f"recipe key {key}: {e}") from None


def check_tokenizers(recipe: Recipe, selected: set[str]) -> None:
    """Folders the selected stages read, and one vocabulary for student, teacher and recipe."""
    tok_path = recipe.tokenizer.path
    recipe_tok = check_tokenizer_folder("tokenizer.path", Path(tok_path)) if tok_path else None
    # The folders whose tokenizer must be the recipe's, with the reason.
    owners: list[tuple[str, str, str]] = []  # (recipe key, folder, who)
    local = recipe.teacher.kind == "local"
    teacher_key = "teacher.path" if recipe.teacher.path else "teacher.init"
    teacher_dir = (recipe.teacher.path or recipe.teacher.init) if local else None
    student = recipe.student
    teacher_users = {"teacher", "cache", "eval"}
    if student.init == "teacher_layers":
        teacher_users |= {"distill", "baseline"}
    if teacher_dir and selected & (teacher_users | {"tokenizer"}):
        owners.append((teacher_key, teacher_dir, "the teacher's"))
    student_users = {"tokenizer", "distill", "baseline"}
    if student.init == "pretrained" and student.path and selected & student_users:
        owners.append(("student.path", student.path, "the student's (student.init pretrained)"))
    for key, folder, who in owners:
        owner_tok = check_model_folder(key, Path(folder))
        if recipe_tok is None:
            raise BadInput(
                f"recipe key tokenizer.path: not set, so a new tokenizer would be trained, but "
                f"{who} is in {folder}; set tokenizer.path: {folder}"
            )
        mine, theirs = vocab_hash(recipe_tok), vocab_hash(owner_tok)
        if mine != theirs:
            raise BadInput(
                f"recipe key tokenizer.path: the tokenizer in {tok_path} (vocab hash {mine}) does "
                f"not match {who} in {folder} ({theirs}); set tokenizer.path: {folder}"
            )
    for key, folder, _ in owners:  # the architecture, once the cheaper checks have passed
        check_architecture_folder(key, Path(folder))
    if student.init == "teacher_layers" and teacher_dir and selected & {"distill", "baseline"}:
        # the layers kept exist and line up with their kinds (no weights read)
        check_teacher_layers(teacher_dir, student.layer_stride, student.layers)
    on_policy = (
        recipe.distill.mode != "offline"
        or any(c.mode != "offline" for c in recipe.distill.compare)
        or (recipe.refine.steps > 0 and recipe.refine.mode != "offline")
    )
    if on_policy and "distill" in selected and teacher_dir and recipe_tok:
        # the teacher scores the student's text: both must read it in the same chat format
        check_templates(recipe_tok, check_model_folder(teacher_key, Path(teacher_dir)), teacher_dir)


def check_group(recipe, stages: list[str], world: int) -> None:
    """BadInput unless the recipe's `stages` can run data-parallel on `world` ranks: every
    global batch they train divides by the world size (times grad_accum), and distillation is
    offline (on-policy sampling is per process)."""
    trained = []
    if {"distill", "baseline"} & set(stages):
        trained.append(("train", recipe.train))
    teacher = recipe.teacher
    if "teacher" in stages and teacher.kind == "local" and not teacher.path:
        trained.append(("teacher.train", teacher.train))
    for key, cfg in trained:
        check_batch(cfg.batch_size, f"{key}.batch_size", world, cfg.grad_accum)
    modes = [("distill.mode", recipe.distill.mode)] + [
        (f"distill.compare[{i}].mode", c.mode) for i, c in enumerate(recipe.distill.compare)
    ]
    if recipe.refine.steps:
        modes.append(("refine.mode", recipe.refine.mode))
    for key, mode in modes:
        if "distill" in stages and mode != "offline":
            raise BadInput(
                f"recipe key {key}: {mode} runs in one process (each rank would sample the "
                "whole batch); run it without a distributed group, or use offline"
            )
