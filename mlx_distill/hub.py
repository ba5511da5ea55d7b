"""Hugging Face Hub ids in a recipe, resolved to folders of the Hub cache before any stage writes.

A model path (`teacher.path`, `teacher.init`, `student.path`, `tokenizer.path`) that is not an
existing local folder and reads `org/name` or `org/name@revision` (a branch, tag or commit) is a
Hub model repo; a data path (`data.train`, `data.valid`, `data.test`) of that form that is not a
local file or folder, and does not end in a data file suffix, is a Hub dataset repo. Either is
fetched through `huggingface_hub`'s cache as mlx-lm does (`HF_HOME`/`HF_HUB_CACHE`, `HF_TOKEN`,
`HF_HUB_OFFLINE=1`: cache only), only the files this project reads: configs, tokenizers and
safetensors weights for models (never Python code, never pickles), data files for datasets.

`resolve_recipe` replaces each id in a recipe with its snapshot folder
(`.../models--org--name/snapshots/<commit>`); `portable` turns such a folder back into
`org/name@<commit>`, the form fingerprints hash, so a run records the commit it used and keeps
its fingerprint when the cache moves.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from mlx_distill.errors import BadInput

# What a model snapshot needs: configs (and the weight index), tokenizer files, chat templates,
# weights from safetensors only (model*.safetensors, as mlx-lm fetches them).
CONFIG_PATTERNS = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
MODEL_PATTERNS = CONFIG_PATTERNS + ["model*.safetensors"]
# A dataset's data files (any configuration and split) and its card, whose YAML maps configs.
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")
DATASET_PATTERNS = [f"*{s}" for s in DATA_SUFFIXES if s != ".txt"] + ["README.md"]

_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?$")
_SNAPSHOT = re.compile(r"(models|datasets)--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})/?$")


def split_id(value: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `value` reads as `org/name[@revision]`, else None."""
    match = _ID.match(value)
    return (match.group(1), match.group(2)) if match else None


def hf_home() -> Path:
    """HF_HOME, else $XDG_CACHE_HOME/huggingface, read at call time (huggingface_hub and
    datasets read it once, at import)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(os.environ.get("HF_HOME", default)).expanduser()


def hub_cache() -> Path:
    """The Hub cache folder: HF_HUB_CACHE, else HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return hf_home() / "hub"


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to 1/true/yes/on: the cache only."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().lower() in ("1", "true", "yes", "on")


def snapshot(key: str, repo: str, revision: str | None, kind: str, patterns: list[str]) -> Path:
    """The cache folder of `repo` (a model or dataset repo, per `kind`) at `revision` (None: the
    main branch) holding the files matching `patterns`: fetched when missing, unless offline.
    Every failure is one BadInput line that names the recipe key `key`."""
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 1.x

    rev = revision or "main"
    what = f"Hub {kind} repo {repo} (revision {rev})"
    command = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    if kind == "dataset":
        command += " --repo-type dataset"
    try:
        folder = snapshot_download(
            repo,
            repo_type=kind,
            revision=rev,
            cache_dir=hub_cache(),
            allow_patterns=patterns,
            local_files_only=offline(),
            endpoint=os.environ.get("HF_ENDPOINT") or None,  # read at call time, like the rest
        )
    except GatedRepoError:
        raise BadInput(
            f"recipe key {key}: {what} is gated; accept its terms on huggingface.co and set "
            "HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise BadInput(
            f"recipe key {key}: {repo} is not a local path, and the Hub has no {kind} repo "
            f"{repo} (or it is private: set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise BadInput(
            f"recipe key {key}: the Hub {kind} repo {repo} has no revision {rev}"
        ) from None
    except LocalEntryNotFoundError as e:
        if isinstance(e, incomplete):
            raise BadInput(
                f"recipe key {key}: the cached snapshot of {what} misses files and the Hub "
                f"cannot be reached; run once online, or: {command}"
            ) from None
        why = "HF_HUB_OFFLINE=1" if offline() else "the Hub cannot be reached"
        raise BadInput(
            f"recipe key {key}: {repo} is not a local path, {why}, and {hub_cache()} has no "
            f"snapshot of {what}; run once online, or: {command}"
        ) from None
    except HFValidationError as e:
        raise BadInput(f"recipe key {key}: {repo} is not a valid Hub repo id: {e}") from None
    return Path(folder)


def model_folder(key: str, value: str) -> str:
    """`value` unchanged if it is a local path or no Hub id, else the snapshot folder of the
    Hub model repo it names, with its safetensors weights."""
    parts = None if Path(value).expanduser().exists() else split_id(value)
    if parts is None:
        return value  # a local folder, or a missing one that the preflight names
    folder = snapshot(key, *parts, "model", MODEL_PATTERNS)
    if not list(folder.glob("model*.safetensors")):
        rev = parts[1] or "main"
        raise BadInput(
            f"recipe key {key}: the cached snapshot of {parts[0]} (revision {rev}) has no "
            f"model*.safetensors weights (only its config was fetched, or the repo has no "
            f"safetensors); run once online, or: hf download {parts[0]} --revision {rev}"
        )
    return str(folder)


def config_folder(value: str | Path, key: str = "path") -> Path:
    """A local folder holding the config.json (and tokenizer files) of `value`: the local
    folder itself, or the snapshot of the Hub model repo it names fetched without weights
    (what `plan` needs to size a model before its download)."""
    parts = None if Path(value).expanduser().exists() else split_id(str(value))
    if parts is None:
        return Path(value)
    return snapshot(key, *parts, "model", CONFIG_PATTERNS)


def dataset_folder(key: str, value: str) -> str:
    """`value` unchanged if it is a local file or folder, names a data file or is no Hub id,
    else the snapshot folder of the Hub dataset repo it names (its data files)."""
    if Path(value).expanduser().exists() or value.endswith(DATA_SUFFIXES):
        return value
    parts = split_id(value)
    if parts is None:
        return value
    return str(snapshot(key, *parts, "dataset", DATASET_PATTERNS))


def resolve_recipe(recipe) -> None:
    """Replace every Hub id among the recipe's model and data paths with its cache folder (in
    place), fetching what is missing. Only the paths the recipe uses are resolved."""
    t, s, tok = recipe.teacher, recipe.student, recipe.tokenizer
    if t.kind == "local" and t.path:
        t.path = model_folder("teacher.path", t.path)
    elif t.kind == "local" and t.init:
        t.init = model_folder("teacher.init", t.init)
    if s.init == "pretrained" and s.path:
        s.path = model_folder("student.path", s.path)
    if tok.path:
        tok.path = model_folder("tokenizer.path", tok.path)
    for split in ("train", "valid", "test"):
        value = getattr(recipe.data, split)
        if value:
            setattr(recipe.data, split, dataset_folder(f"data.{split}", value))


def resolve_configs(recipe) -> None:
    """As `resolve_recipe` for the model paths, fetching each Hub model's config.json and
    tokenizer files only (`config_folder`): what `plan` sizes a run from before a download."""
    t, s, tok = recipe.teacher, recipe.student, recipe.tokenizer
    if t.kind == "local" and t.path:
        t.path = str(config_folder(t.path, "teacher.path"))
    elif t.kind == "local" and t.init:
        t.init = str(config_folder(t.init, "teacher.init"))
    if s.init == "pretrained" and s.path:
        s.path = str(config_folder(s.path, "student.path"))
    if tok.path:
        tok.path = str(config_folder(tok.path, "tokenizer.path"))


def portable(value):
    """`org/name@<commit>` for a snapshot folder of the Hub cache (models or datasets), else
    `value`; dicts and lists are mapped through."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str):
        match = _SNAPSHOT.search(value)
        if match:
            return f"{match.group(2)}/{match.group(3)}@{match.group(4)}"
    return value


def folder_digest(folder: str | Path) -> str:
    """16 hex digits over the names and contents of every file under `folder` (a local
    dataset folder); a Hub snapshot is named by its commit instead."""
    named = portable(str(folder))
    if named != str(folder):
        return hashlib.sha256(named.encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]
