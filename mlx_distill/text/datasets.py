"""Data splits from a dataset folder through Hugging Face `datasets` (the `hub` extra).

A folder of data files (parquet, JSONL, JSON, CSV, arrow; one split per file name, as
`datasets` infers them, or as the dataset card's YAML maps them), a folder written by
`save_to_disk`, or the cache snapshot of a Hub dataset repo (`hub.dataset_folder`). Columns are
renamed to the record keys `text.data` reads with mlx-lm's feature names
(`data.dataset.prompt_feature` -> prompt, `completion_feature` -> completion, `chat_feature` ->
messages, `text_feature` -> text); every other column is kept (an `answer` for the task checker).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlx_distill import hub
from mlx_distill.errors import BadInput


def _datasets():
    try:
        import datasets
    except ImportError:
        raise BadInput(
            "reading a dataset folder or Hub dataset id needs the `datasets` package: "
            "pip install 'mlx-distill[hub]'"
        ) from None
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _cache() -> str:
    """datasets' Arrow cache: HF_DATASETS_CACHE, else HF_HOME/datasets (read at call time)."""
    return os.path.expanduser(os.environ.get("HF_DATASETS_CACHE", hub.hf_home() / "datasets"))


def _load(folder: Path, config: str | None, split: str, key: str):
    """The `split` of the dataset in `folder` (configuration `config`); `key`: data.<which>."""
    datasets = _datasets()
    which = key.split(".")[-1]
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        loaded = datasets.load_from_disk(str(folder))  # a save_to_disk folder
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise BadInput(
                    f"recipe key {key}: {folder} has no split {split!r} (splits: "
                    f"{', '.join(loaded)}); set data.dataset.{which}_split"
                )
            return loaded[split]
        return loaded
    try:
        return datasets.load_dataset(str(folder), name=config, split=split, cache_dir=_cache())
    except ValueError as e:  # an unknown split or configuration: datasets names the choices
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(
            f"recipe key {key}: {folder}: {message} (data.dataset.{which}_split: {split}, "
            f"data.dataset.config: {config})"
        ) from None
    except FileNotFoundError as e:
        raise BadInput(f"recipe key {key}: no data files in {folder}: {e}") from None


def read_rows(folder: str | Path, dataset: Any, split: str, limit: int | None = None):
    """(label, rows) of data.<split> (`split`: train, valid or test) read from `folder` with
    the settings `dataset` (recipe.DatasetConfig): the split named by its `<split>_split`, the
    columns renamed by its features. label: "FOLDER [SPLIT]", for messages naming a row."""
    key = f"data.{split}"
    name = getattr(dataset, f"{split}_split")
    table = _load(Path(folder), dataset.config, name, key)
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    renames = {
        dataset.prompt_feature: "prompt",
        dataset.completion_feature: "completion",
        dataset.chat_feature: "messages",
        dataset.text_feature: "text",
    }
    rows = []
    for row in table:
        record = dict(row)
        for column, field in renames.items():
            if column in row:
                record[field] = row[column]
        if isinstance(record.get("messages"), list):
            # Arrow gives every turn every key any turn has (None where it had none): drop those
            # Nones, so a turn reads as written (no `tool_calls: None` on a plain answer).
            record["messages"] = [
                {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                for m in record["messages"]
            ]
        rows.append(record)
    return f"{folder} [{name}]", rows
