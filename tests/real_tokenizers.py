"""Real tokenizers (Qwen2, Llama 3, Gemma 4) built from llama.cpp's vocab-only GGUF files, and
Qwen3 (Qwen2's vocabulary, Qwen3's added tokens and chat template).

The folders under tests/fixtures/tokenizers/ hold tokenizer.json compressed with xz (see
tests/fixtures/tokenizers/build.py, which rebuilds them from the llama-cpp-python sdist). Use
`tokenizer_dir(name)` for a plain Hugging Face tokenizer folder (decompressed once per process
into a temp dir), `load(name)` for the loaded tokenizer, and `ground_truth(name)` for
llama.cpp's reference encodings. Qwen3 shares Qwen2's byte-level BPE: its folder holds only
Qwen3's tokenizer_config.json, and its tokenizer.json is Qwen2's with the added tokens that
config lists (ids 151646..151668, `<think>` and `</think>` among them) appended.
"""

from __future__ import annotations

import atexit
import json
import lzma
import shutil
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
NAMES = ("qwen2", "llama3", "gemma4", "qwen3")
BUILT_FROM = {"qwen3": "qwen2"}  # fixtures whose tokenizer.json is another's plus added tokens
# Facts about each family that tests assert on (from the models' own tokenizer files).
FACTS = {
    "qwen2": {"vocab": 151646, "embedding_rows": 151936, "end_of_turn": "<|im_end|>"},
    "llama3": {"vocab": 128256, "embedding_rows": 128256, "end_of_turn": "<|eot_id|>"},
    "gemma4": {"vocab": 262144, "embedding_rows": 262144, "end_of_turn": "<turn|>"},
    "qwen3": {"vocab": 151669, "embedding_rows": 151936, "end_of_turn": "<|im_end|>"},
}

_made: dict[str, Path] = {}
_root: Path | None = None


def available(name: str) -> bool:
    return (FIXTURES / BUILT_FROM.get(name, name) / "tokenizer.json.xz").is_file()


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
    base = FIXTURES / BUILT_FROM.get(name, name)
    data = lzma.decompress((base / "tokenizer.json.xz").read_bytes())
    if name in BUILT_FROM:
        data = _with_added_tokens(data, src / "tokenizer_config.json")
    (out / "tokenizer.json").write_bytes(data)
    shutil.copy2(src / "tokenizer_config.json", out / "tokenizer_config.json")
    _made[name] = out
    return out


def _with_added_tokens(tokenizer_json: bytes, config_path: Path) -> bytes:
    """`tokenizer_json` with the config's added tokens it lacks appended (id, content, special)."""
    tok = json.loads(tokenizer_json)
    have = {t["id"] for t in tok["added_tokens"]}
    decoder = json.loads(config_path.read_text(encoding="utf-8"))["added_tokens_decoder"]
    for key, t in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        if int(key) not in have:
            fields = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
            tok["added_tokens"].append({"id": int(key), **{f: t[f] for f in fields}})
    return json.dumps(tok, ensure_ascii=False).encode()


_loaded: dict[str, object] = {}


def load(name: str):
    """The mlx-lm TokenizerWrapper for `name`, loaded once per process (loading takes seconds)."""
    if name not in _loaded:
        from mlx_distill.text.tokenizer import load_tokenizer

        _loaded[name] = load_tokenizer(tokenizer_dir(name))
    return _loaded[name]


def ground_truth(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's (text, ids) pairs: the original tokenizer's encode(text, no special tokens)."""
    src = FIXTURES / BUILT_FROM.get(name, name)  # Qwen3 encodes text as Qwen2 does
    texts = (src / "vocab_test.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (src / "vocab_test.out").read_text(encoding="utf-8").split("\n")
    texts, ids = texts[:-1], ids[: len(texts) - 1]
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]
