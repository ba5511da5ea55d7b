"""Real tokenizers (Qwen2, Llama 3, Gemma 4) built from llama.cpp's vocab-only GGUF files.

The folders under tests/fixtures/tokenizers/ hold tokenizer.json compressed with xz (see
tests/fixtures/tokenizers/build.py, which rebuilds them from the llama-cpp-python sdist). Use
`tokenizer_dir(name)` for a plain Hugging Face tokenizer folder (decompressed once per process
into a temp dir), `load(name)` for the loaded tokenizer, and `ground_truth(name)` for
llama.cpp's reference encodings.
"""

from __future__ import annotations

import atexit
import lzma
import shutil
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
NAMES = ("qwen2", "llama3", "gemma4")
# Facts about each family that tests assert on (from the models' own tokenizer files).
FACTS = {
    "qwen2": {"vocab": 151646, "embedding_rows": 151936, "end_of_turn": "<|im_end|>"},
    "llama3": {"vocab": 128256, "embedding_rows": 128256, "end_of_turn": "<|eot_id|>"},
    "gemma4": {"vocab": 262144, "embedding_rows": 262144, "end_of_turn": "<turn|>"},
}

_made: dict[str, Path] = {}
_root: Path | None = None


def available(name: str) -> bool:
    return (FIXTURES / name / "tokenizer.json.xz").is_file()


def tokenizer_dir(name: str) -> Path:
    """A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) for `name`."""
    global _root
    if name not in NAMES:
        raise KeyError(f"unknown tokenizer fixture {name!r}; have {NAMES}")
    if name in _made:
        return _made[name]
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="real-tokenizers-"))
        atexit.register(shutil.rmtree, _root, True)
    src, out = FIXTURES / name, _root / name
    out.mkdir()
    (out / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))
    shutil.copy2(src / "tokenizer_config.json", out / "tokenizer_config.json")
    _made[name] = out
    return out


_loaded: dict[str, object] = {}


def load(name: str):
    """The mlx-lm TokenizerWrapper for `name`, loaded once per process (loading takes seconds)."""
    if name not in _loaded:
        from mlx_distill.text.tokenizer import load_tokenizer

        _loaded[name] = load_tokenizer(tokenizer_dir(name))
    return _loaded[name]


def ground_truth(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's (text, ids) pairs: the original tokenizer's encode(text, no special tokens)."""
    src = FIXTURES / name
    texts = (src / "vocab_test.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (src / "vocab_test.out").read_text(encoding="utf-8").split("\n")
    texts, ids = texts[:-1], ids[: len(texts) - 1]
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]
