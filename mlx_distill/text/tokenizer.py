"""Tokenizers: SentencePiece training for from-scratch models, loading, hashing, chat encoding.

A from-scratch tokenizer is trained with SentencePiece (BPE or unigram, digits split) and then
served through a Hugging Face fast tokenizer built from the same pieces, so `mlx_lm.load` and
`mlx_lm generate` read it offline like any other model folder. Plain text encodes to the same
ids either way (tested); the chat format's markers are added tokens.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
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


def load_tokenizer(path: str | Path):
    """An mlx-lm TokenizerWrapper for a model or tokenizer folder (offline, no remote code)."""
    from mlx_lm.tokenizer_utils import load as load_wrapper

    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise BadInput(f"no tokenizer files in {path}")
    return load_wrapper(path)


def vocab_hash(tokenizer) -> str:
    """sha256 of the sorted token -> id map: equal only for interchangeable tokenizers."""
    vocab = tokenizer.get_vocab()
    text = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
