"""Tokenizers: SentencePiece training for from-scratch models, loading, hashing, chat encoding.

A from-scratch tokenizer is trained with SentencePiece (BPE or unigram, digits split) and then
served through a Hugging Face fast tokenizer built from the same pieces, so `mlx_lm.load` and
`mlx_lm generate` read it offline like any other model folder. Plain text encodes to the same
ids either way (tested); the chat format's markers are added tokens.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from mlx_distill.errors import BadInput

# The from-scratch tokenizer's own pieces. Only `train_sentencepiece` uses them: training and
# evaluation ask any tokenizer for its markers (text/chat.py), never assume these.
SPECIALS = ["<pad>", "<unk>", "<s>", "<|end|>"]  # ids 0..3, fixed
MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<think>", "</think>", "\n"]
SCRATCH_EOS = "<|end|>"
# What a tokenizer folder holds; copied next to every saved model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.model",
    "chat_template.jinja",
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}<|end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_sentencepiece(
    texts: Iterable[str], out_dir: str | Path, *, vocab_size: int, model_type: str = "bpe"
) -> Path:
    """Train a SentencePiece model on `texts` and save an HF tokenizer folder at `out_dir`."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        # SentencePiece reads one sentence per line: keep newlines as a visible marker token.
        corpus.write_text("\n".join(t.replace("\n", " ") for t in texts))
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_prefix=str(out_dir / "sentencepiece"),
                vocab_size=vocab_size,
                model_type=model_type,
                split_digits=True,
                character_coverage=1.0,
                user_defined_symbols=MARKERS[:-1],
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                eos_piece=SCRATCH_EOS,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                num_threads=2,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise BadInput(f"SentencePiece training failed: {str(e).splitlines()[-1]}") from None
    _export_hf(out_dir / "sentencepiece.model", out_dir)
    return out_dir


def _export_hf(model_file: Path, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json equivalent to the SentencePiece model."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = set(SPECIALS + MARKERS)
    if "\n" not in vocab:  # the newline marker is ours, appended after SentencePiece's pieces
        vocab["\n"] = len(vocab)
    merges = []
    # SentencePiece BPE ranks a merge by the id of the piece it makes (lower id = earlier).
    for piece, pid in sorted(vocab.items(), key=lambda kv: kv[1]):
        if piece in special or len(piece) < 2:
            continue
        splits = [
            (vocab[piece[:i]], vocab[piece[i:]], piece[:i], piece[i:])
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges += [(pid, a, b, left, right) for a, b, left, right in sorted(splits)]
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token="<unk>")
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKERS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=SCRATCH_EOS,
        chat_template=CHAT_TEMPLATE,
    )
    hf.save_pretrained(str(out_dir))


# Files a tokenizer load reads (Hugging Face's and mlx-lm's names): the cache key hashes them.
_TOKENIZER_INPUTS = (
    *TOKENIZER_FILES,
    "added_tokens.json",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "tiktoken.model",
)
_LOADED: OrderedDict[tuple, object] = OrderedDict()  # content key -> TokenizerWrapper
_LOADED_MAX = 8


def _content_key(path: Path) -> str:
    """sha256 over the tokenizer files' names and bytes, and config.json's model_type and
    tokenizer_class (which a load without tokenizer_class in tokenizer_config.json reads)."""
    digest = hashlib.sha256()
    names = sorted({*_TOKENIZER_INPUTS, *(p.name for p in path.glob("*.tiktoken"))})
    for name in names:
        file = path / name
        if file.is_file():
            digest.update(f"{name}:{file.stat().st_size}:".encode())
            digest.update(file.read_bytes())
    config = path / "config.json"
    if config.is_file():
        try:
            fields = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            fields = {}
        if isinstance(fields, dict):
            keep = {k: fields.get(k) for k in ("model_type", "tokenizer_class")}
            digest.update(json.dumps(keep, sort_keys=True).encode())
    return digest.hexdigest()


def _model_defaults(path: Path) -> dict | None:
    """mlx-lm's tokenizer defaults for the folder's architecture (as `mlx_lm.load` applies)."""
    if not (path / "config.json").is_file():
        return None
    from mlx_lm.utils import _tokenizer_defaults

    try:
        return _tokenizer_defaults(path)
    except (ValueError, KeyError, OSError):
        return None


def already_loaded(path: str | Path) -> bool:
    """Whether this process has loaded a tokenizer from these exact files (so they parse)."""
    path = Path(path)
    key = _content_key(path)
    return any(k[0] == key for k in _LOADED)


def load_tokenizer(path: str | Path, eos_token_ids: int | Iterable[int] | None = None):
    """An mlx-lm TokenizerWrapper for a model or tokenizer folder (offline, no remote code).

    Generation stops at the tokenizer's EOS, at `eos_token_ids` (a model's config.json
    `eos_token_id`) and at the chat template's end-of-turn token (`text.chat.end_of_turn`), so
    every sampler of this project stops where a trained turn ends.

    Loading a 150k-token tokenizer takes seconds and a run reads the same one from several
    folders, so loads are cached in this process by content (`_content_key`: the files' bytes,
    never their path or mtime; an edited file is a new key). The wrapper is shared: read it,
    do not change it.
    """
    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise BadInput(f"no tokenizer files in {path}")
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    defaults = _model_defaults(path)
    base_key = (_content_key(path), json.dumps(defaults, sort_keys=True, default=repr))
    extra = tuple(sorted({int(i) for i in eos_token_ids or ()}))
    key = (*base_key, extra)
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    base = _LOADED.get((*base_key, ()))
    if base is None:
        base = _load(path, defaults)
        _remember((*base_key, ()), base)
    wrapper = base
    if extra and not set(extra) <= base.eos_token_ids:
        wrapper = copy.copy(base)  # shares the loaded tokenizer; only the stop ids differ
        wrapper.eos_token_ids = base.eos_token_ids | set(extra)
    _remember(key, wrapper)
    return wrapper


def _remember(key: tuple, wrapper) -> None:
    _LOADED[key] = wrapper
    _LOADED.move_to_end(key)
    while len(_LOADED) > _LOADED_MAX:
        _LOADED.popitem(last=False)


def _load(path: Path, defaults: dict | None):
    from mlx_lm.tokenizer_utils import load as load_wrapper

    from mlx_distill.text.chat import end_of_turn

    wrapper = load_wrapper(path, defaults=defaults)
    try:
        wrapper.eos_token_ids = wrapper.eos_token_ids | {end_of_turn(wrapper)[1]}
    except BadInput:
        pass  # a template that renders no end-of-turn token: the encoder and preflight say so
    return wrapper


_VOCAB_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocab_hash(tokenizer) -> str:
    """sha256 of the sorted token -> id map: equal only for interchangeable tokenizers.

    Remembered per tokenizer object and its length (a 150k vocabulary takes about a second to
    hash, and a run asks for the same one's hash several times; an added token changes it).
    """
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        size, digest = _VOCAB_HASHES.get(hf, (None, None))
    except TypeError:  # not weak-referenceable: compute every time
        size, digest = None, None
    if digest is not None and size == len(hf):
        return digest
    vocab = tokenizer.get_vocab()
    text = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    try:
        _VOCAB_HASHES[hf] = (len(hf), digest)
    except TypeError:
        pass
    return digest


def template_hash(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def prompt_text(tokenizer, prompt: str, system: str | None = None) -> str:
    """The chat-formatted prompt, ending where the assistant's answer begins (see text/chat.py;
    a tokenizer without a chat template gets the plain format)."""
    from mlx_distill.text.chat import generation_prompt

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return generation_prompt(tokenizer, messages)
