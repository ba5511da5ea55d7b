"""Every input a run reads, checked before any stage writes: one line per problem, exit 2.

Data files (UTF-8, JSONL shape, with the line), tokenizer folders (JSON files, loading, chat
template), model folders (config.json, safetensors weights, an architecture whose head contract
holds on a probe: `models.check_folder`) and the tokenizer agreement between
student, teacher and `tokenizer.path`: a student's weights only make sense with the tokenizer
they were trained with (its own folder for `student.init: pretrained`, the teacher's for
`teacher_layers`), and a teacher with another tokenizer is distilled offline with aligned top-k
targets. In a distributed group, what
the group can run data-parallel (`check_group`).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_distill.errors import BadInput
from mlx_distill.hub import resolve_recipe
from mlx_distill.models import check_folder, check_teacher_layers
from mlx_distill.recipe import STAGES, Recipe
from mlx_distill.run.table import TABLE
from mlx_distill.text.chat import ChatEncoder, conversation_shape, record_shape
from mlx_distill.text.data import read_jsonl, read_split
from mlx_distill.text.tokenizer import already_loaded, load_tokenizer, vocab_hash
from mlx_distill.train.distributed import check_batch
from mlx_distill.train.onpolicy import check_templates


def check_inputs(recipe: Recipe, stages: list[str]) -> None:
    """Raise BadInput for the first bad input that the `stages` about to run would read.
    Hub ids in the recipe are first replaced with their cache folders (fetched if missing)."""
    resolve_recipe(recipe)
    selected = set(stages)
    records = {}
    for split in ("train", "valid", "test"):
        users = {s for s in STAGES if split in TABLE[s].reads}
        if not users & selected:
            continue
        value = getattr(recipe.data, split)
        if value is None:
            if split != "train":
                continue  # optional: the eval stage scores what it has (stages/eval.held_out)
            used_by = ", ".join(s for s in STAGES if s in users & selected)
            raise BadInput(f"recipe key data.{split}: not set (the {used_by} stage reads it)")
        if Path(value).is_dir():  # a dataset folder (a Hub dataset id is one by now)
            records[split] = read_split(recipe.data, split)
        else:
            records[split] = check_data_file(f"data.{split}", Path(value))
    if any(TABLE[s].reads for s in selected):  # every stage that reads data encodes it
        cross = check_tokenizers(recipe, selected)
        check_renders(recipe, selected, records)
        check_answers(recipe, selected, records.get("train"), cross)


def check_answers(recipe: Recipe, selected: set[str], train: list | None, cross: bool) -> None:
    """The training records as the teacher answers them (teacher.answers: generate) or as a
    teacher with another tokenizer reads them: chat records with a text answer, whose
    conversation the teacher's own template renders."""
    generate = recipe.teacher.answers == "generate" and "teacher" in selected
    if not train or not (generate or (cross and "cache" in selected)):
        return
    from mlx_distill.teachers.cross import conversation
    from mlx_distill.text.chat import generation_prompt

    teacher_tok = load_tokenizer(recipe.teacher.path) if recipe.teacher.path else None
    seen = set()
    for n, record in enumerate(train):
        where = f"{recipe.data.train} record {n + 1}"
        context, _ = conversation(record, where)
        shape = tuple(m["role"] for m in context)
        if teacher_tok is not None and shape not in seen:
            seen.add(shape)
            generation_prompt(teacher_tok, context, f"{where} (the teacher's chat template)")


def check_renders(recipe: Recipe, selected: set[str], records: dict[str, list]) -> None:
    """Every split renders with the chat template of each tokenizer that will encode it.

    The recipe's tokenizer encodes every split; a local teacher's own folder encodes the test
    split too (the eval stage scores the teacher with its tokenizer). One record per distinct
    sequence of roles (and tools, tool calls) is rendered, the way the encoder does (prefix by
    prefix): what a template checks (a system turn it rejects, alternating roles) depends on
    those. A trained SentencePiece tokenizer uses the project's own template, which renders
    every known role.
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
            shape = conversation_shape(record)
            if shape not in seen:
                seen.add(shape)
                encoder.rows(record)  # a template error names the record's file and line
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


def check_tokenizers(recipe: Recipe, selected: set[str]) -> bool:
    """Folders the selected stages read, and the tokenizer agreement the run needs: the
    student's weights with the tokenizer they were trained with, and a teacher that shares it,
    or a given local teacher with its own (cross-tokenizer: offline, top-k targets aligned by
    character offsets, `teachers/cross.py`). True for such a teacher."""
    tok_path = recipe.tokenizer.path
    recipe_tok = check_tokenizer_folder("tokenizer.path", Path(tok_path)) if tok_path else None
    local = recipe.teacher.kind == "local"
    teacher_key = "teacher.path" if recipe.teacher.path else "teacher.init"
    teacher_dir = (recipe.teacher.path or recipe.teacher.init) if local else None
    student = recipe.student
    student_users = {"tokenizer", "distill", "baseline"}
    owners = []  # (recipe key, folder) of the models whose architecture is proven below
    if student.init == "pretrained" and student.path and selected & student_users:
        student_tok = check_model_folder("student.path", Path(student.path))
        who = "the student's (student.init pretrained)"
        _same_tokenizer(recipe_tok, tok_path, student_tok, student.path, who)
        owners.append(("student.path", student.path))
    teacher_users = {"teacher", "cache", "eval"}
    if student.init == "teacher_layers":
        teacher_users |= {"distill", "baseline"}
    cross = False
    if teacher_dir and selected & (teacher_users | {"tokenizer"}):
        teacher_tok = check_model_folder(teacher_key, Path(teacher_dir))
        if recipe_tok is None:
            raise BadInput(
                f"recipe key tokenizer.path: not set, so a new tokenizer would be trained, but "
                f"the teacher's is in {teacher_dir}; set tokenizer.path: {teacher_dir} (or the "
                "student's tokenizer folder, for a student with another vocabulary)"
            )
        cross = vocab_hash(recipe_tok) != vocab_hash(teacher_tok)
        if cross:
            _cross_tokenizer_allowed(recipe, teacher_dir, teacher_key)
        owners.insert(0, (teacher_key, teacher_dir))
    for key, folder in owners:  # the architecture, once the cheaper checks have passed
        check_architecture_folder(key, Path(folder))
    if student.init == "teacher_layers" and teacher_dir and selected & {"distill", "baseline"}:
        # the layers kept exist and line up with their kinds (no weights read)
        check_teacher_layers(teacher_dir, student.layer_stride, student.layers)
    if teacher_dir and not cross and _on_policy(recipe) and "distill" in selected and recipe_tok:
        # the teacher scores the student's text: both must read it in the same chat format
        teacher_tok = check_model_folder(teacher_key, Path(teacher_dir))
        check_templates(recipe_tok, teacher_tok, teacher_dir)
    return cross


def _same_tokenizer(recipe_tok, tok_path, owner_tok, folder: str, who: str) -> None:
    if recipe_tok is None:
        raise BadInput(
            f"recipe key tokenizer.path: not set, so a new tokenizer would be trained, but "
            f"{who} is in {folder}; set tokenizer.path: {folder}"
        )
    mine, theirs = vocab_hash(recipe_tok), vocab_hash(owner_tok)
    if mine != theirs:
        raise BadInput(
            f"recipe key tokenizer.path: the tokenizer in {tok_path} (vocab hash {mine}) does "
            f"not match {who} in {folder} ({theirs}), which its weights were trained with; set "
            f"tokenizer.path: {folder}"
        )


def _on_policy(recipe: Recipe) -> bool:
    return (
        recipe.distill.mode != "offline"
        or any(c.mode != "offline" for c in recipe.distill.compare)
        or (recipe.refine.steps > 0 and recipe.refine.mode != "offline")
    )


def _cross_tokenizer_allowed(recipe: Recipe, teacher_dir: str, teacher_key: str) -> None:
    """A teacher whose tokenizer is not tokenizer.path's: what cross-tokenizer distillation
    from a local teacher supports (offline, top-k, a given teacher folder), else one line."""
    why = f"the teacher in {teacher_dir} has another tokenizer than tokenizer.path"
    if teacher_key != "teacher.path":
        raise BadInput(
            f"recipe key teacher.init: {why}; a teacher the recipe trains uses the run's "
            f"tokenizer: set tokenizer.path: {teacher_dir}"
        )
    if recipe.student.init == "teacher_layers":
        raise BadInput(
            f"recipe key student.init: teacher_layers copies the teacher's embeddings, and {why}; "
            f"set tokenizer.path: {teacher_dir}"
        )
    if _on_policy(recipe):
        raise BadInput(
            f"recipe key distill.mode: on-policy distillation needs a teacher that reads the "
            f"student's tokens, and {why}; cross-tokenizer distillation is offline only "
            "(distill.mode, distill.compare modes and refine.mode: offline)"
        )
    if recipe.cache.targets != "topk":
        raise BadInput(
            f"recipe key cache.targets: {why}; its candidates are aligned to the student's "
            "tokens as top-k targets: set cache.targets: topk"
        )


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
    if recipe.teacher.answers == "generate" and "teacher" in stages:
        raise BadInput(
            "recipe key teacher.answers: generate decodes the teacher's answers in one "
            "process; run the teacher stage without a distributed group first"
        )
    for key, mode in modes:
        if "distill" in stages and mode != "offline":
            raise BadInput(
                f"recipe key {key}: {mode} runs in one process (each rank would sample the "
                "whole batch); run it without a distributed group, or use offline"
            )
