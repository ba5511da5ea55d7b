"""Atomic writes and file hashing: the one home of each.

A reader (another stage, a resumed run, a second process) sees either the old file or the new
one, never a torn one: content goes to a temp file beside the target, is fsynced, then renamed
over it, and the folder is fsynced so the rename itself survives a crash. Folders are written
the same way: built under a temp name, then renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_chunks_atomic(path: str | Path, chunks: Iterable[bytes]) -> str:
    """Replace `path` with the concatenated `chunks` atomically and durably (temp file, fsync,
    rename, fsync of the folder). Returns the sha256 of what was written.

    The temp file (`NAME.tmp<pid>`, so two processes never share one) is removed if writing
    fails; one left by a killed process is never read as the file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest.hexdigest()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    write_chunks_atomic(path, [data])


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically and durably."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(
    path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> None:
    """Replace `path` with `obj` as JSON atomically and durably."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, keep_old: bool = False) -> Iterator[Path]:
    """Build a folder under a temp name, then put it in place of `path` in one rename.

    Yields the temp folder to fill (`.NAME.tmp` beside `path`: hidden, so a glob for the
    finished folders never matches it). keep_old: entries of an existing `path` that the new
    folder does not have are moved into it (a base model saved inside an adapter folder).
    If the block raises, the temp folder is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_old and path.is_dir():
        for item in path.iterdir():
            if not (tmp / item.name).exists():
                item.rename(tmp / item.name)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | None) -> str:
    """A short content digest for fingerprints: 16 hex digits, or "unset" / "missing"."""
    if path is None:
        return "unset"
    if not Path(path).is_file():
        return "missing"
    return file_sha256(path)[:16]
