"""What the tests share (no tests here): tiny models, tokenizers and examples, a training run
and the trainer tests' student, data and interrupting loader; the quickstart recipe shrunk to
seconds and the `--set` flattening; the command line in a subprocess (`cli`) or in this process
(`main`, `one_line`, `tree`); free loopback ports; the Gemini tests' key and recipe."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_distill.cache.loader import Loader
from mlx_distill.text.examples import TokenizedExample

ROOT = Path(__file__).resolve().parents[1]
# A scratch student small enough for a test to train it for tens of steps.
SMALL = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
# recipes/quickstart.yaml shrunk to seconds: 16 rows in 2 cache shards, 2 steps of 4 rows, no
# validation pass over 500 rows. A test that needs more appends its own `--set`s after these
# (the last `--set` of a key wins).
QUICKSTART_TINY = (
    "data.max_train=16",
    "cache.shard_rows=8",
    "train.steps=2",
    "train.batch_size=4",
    "train.log_every=1",
    "data.valid=null",
)
TRAINER_VOCAB = 23  # the vocabulary of trainer_examples and trainer_student
GEMINI_KEY = "AIzaFAKE-test-key-7f3c9d"  # distinctive, so a leak is found by grep


def tiny_tokenizer(size: int):
    """An HF fast tokenizer with `size` word-level tokens: t0 ... t{size-1}, t0 unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1")


def tiny_model(vocab_rows: int, seed: int = 0, hidden: int = 32, scale: float = 6.0):
    from mlx_lm.models import llama

    from mlx_distill.models import contract

    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=2,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab_rows,
        tie_word_embeddings=True,
    )
    model = llama.Model(args)
    # scale > 1: larger logits than the default init, a peaked, teacher-like distribution
    model.update({"model": {"embed_tokens": {"weight": model.model.embed_tokens.weight * scale}}})
    mx.eval(model.parameters())
    contract(model)  # as models.build_model does: before a compiled step reads the head
    return model, args


def save_teacher(path: Path, model, args, tokenizer, quantize_bits: int | None = None) -> Path:
    """Write an mlx-lm folder (config.json, model.safetensors, tokenizer files)."""
    import dataclasses

    from mlx_lm.utils import quantize_model, save_config, save_model

    config = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
    if quantize_bits:
        model, config = quantize_model(model, config, group_size=32, bits=quantize_bits)
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model, donate_model=False)
    save_config(config, path / "config.json")
    tokenizer.save_pretrained(path)
    return path


def random_examples(n: int, vocab: int, seed: int, lo: int = 3, hi: int = 40):
    """n examples of random length with a prompt part (mask False) and an answer part."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = int(rng.integers(lo, hi))
        tokens = rng.integers(0, vocab, T)
        mask = np.zeros(T, dtype=bool)
        mask[int(rng.integers(1, T)) :] = True
        out.append(TokenizedExample(tokens, mask, {"id": i, "prompt": f"p{i}"}))
    return out


def counting_examples(n: int, vocab: int, seed: int, lo: int, hi: int, prompt: int | None = None):
    """n sequences of lo..hi-1 tokens counting up mod `vocab` (learnable: next = previous + 1),
    the first `prompt` tokens untrained (None: 1 to 3, drawn per sequence)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        tokens = (int(rng.integers(0, vocab)) + np.arange(length)) % vocab
        mask = np.ones(length, bool)
        mask[: int(rng.integers(1, 4)) if prompt is None else prompt] = False
        out.append(TokenizedExample(tokens.astype(np.int32), mask))
    return out


def tiny_student(vocab: int, seed: int | None, **fields):
    """(model, config): a scratch student (`models.build_model`) of SMALL's size but for
    `fields` (ModelConfig fields), its weights drawn after mx.random.seed(seed) (None: unseeded)."""
    from mlx_distill.models import build_model
    from mlx_distill.recipe import ModelConfig

    if seed is not None:
        mx.random.seed(seed)
    return build_model(ModelConfig(**{**SMALL, **fields}), vocab)


def arithmetic_tokenizer(out: Path) -> Path:
    """`out`, now a 120-id SentencePiece tokenizer folder trained on 300 arithmetic problems."""
    from mlx_distill.tasks import arithmetic
    from mlx_distill.text.tokenizer import train_sentencepiece

    texts = [p["prompt"] + "\n" + p["completion"] for p in arithmetic.generate(300, 1)]
    return train_sentencepiece(texts, out, vocab_size=120)


def vocab_of(tokenizer_dir: Path) -> int:
    """The number of ids of the tokenizer.json in `tokenizer_dir`."""
    return len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])


def weights(model) -> dict[str, np.ndarray]:
    """Every parameter of `model` as a float32 NumPy array, by its dotted name."""
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def train_run(tmp_path: Path, model, loader, cfg, loss_cfg, run: str, fingerprint="fp", **kw):
    """trainer.train as a stage runs it (`stages.inputs.fit`): seeded with 0, the optimizer
    from `make_optimizer`, checkpoints in `tmp_path/run` and metrics in `tmp_path/<run>.jsonl`;
    `kw`: train's other arguments (validate, extra_losses), or `metrics`/`checkpoints` paths."""
    from mlx_distill.train.checkpoint import Checkpoints
    from mlx_distill.train.log import RunLog
    from mlx_distill.train.loss import make_loss
    from mlx_distill.train.trainer import make_optimizer, train

    metrics = kw.pop("metrics", tmp_path / f"{run}.jsonl")
    folder = kw.pop("checkpoints", tmp_path / run)
    mx.random.seed(kw.pop("seed", 0))
    optimizer, master = make_optimizer(model, cfg)
    return train(
        model,
        optimizer,
        loader,
        make_loss(loss_cfg),
        cfg,
        name=run,
        master=master,
        checkpoints=Checkpoints(folder, fingerprint),
        callback=RunLog(metrics, run, progress=False),
        **kw,
    )


def true_spans(mask) -> list[tuple[int, int]]:
    """[start, end) runs of True in a 1-D mask."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def cli(*args: str, env: dict | None = None, timeout: int = 600, **kw):
    """`python -m mlx_distill ARGS` from the repository root, output captured as text;
    env: variables set on top of this process's; kw: subprocess.run's other arguments."""
    return subprocess.run(
        [sys.executable, "-m", "mlx_distill", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
        **kw,
    )


def sets(*overrides: str) -> list[str]:
    """The command-line form of `overrides` ("key=value" each): ["--set", o1, "--set", o2, ...]."""
    return [a for s in overrides for a in ("--set", s)]


def quickstart_sets(runs: Path, *extra: str) -> list[str]:
    """`--set`s for the tiny quickstart (QUICKSTART_TINY) under `runs`, then `extra`."""
    return sets(*QUICKSTART_TINY, f"runs_dir={runs}", *extra)


def main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`mlx-distill ARGS` in this process, from the repository root: (exit code, stdout,
    stderr)."""
    from mlx_distill import cli as command

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["mlx-distill", *args])
    capsys.readouterr()
    code = 0
    try:
        command.main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str) -> str:
    """The single error line of a refusal (exit 2, nothing else on stderr)."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def tree(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (empty when it does not exist)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def trainer_examples(n: int = 40, seed: int = 0):
    """The trainer tests' data: counting sequences of 6-13 tokens over TRAINER_VOCAB ids, the
    first 2 untrained."""
    return counting_examples(n, TRAINER_VOCAB, seed, 6, 14, prompt=2)


def trainer_student():
    """The trainer tests' scratch student (SMALL, seed 3) over TRAINER_VOCAB ids."""
    return tiny_student(TRAINER_VOCAB, 3)[0]


class InterruptingLoader(Loader):
    """A loader that stops the process (as a kill would) when batch `at` is requested."""

    def __init__(self, *args, at, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.count = at, 0

    def __next__(self):
        self.count += 1
        if self.count == self.at:
            raise KeyboardInterrupt
        return super().__next__()


def gemini_overrides(fake, **gemini) -> list[str]:
    """Recipe overrides for a Gemini teacher at the loopback fake (`fake_gemini.FakeGemini`):
    short timeouts and backoffs, no rate limit; `gemini`: teacher.gemini keys to change."""
    base = {
        "base_url": fake.base_url,
        "timeout_s": 1,
        "max_retries": 3,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "rpm": 0,
        "max_in_flight": 4,
    }
    base.update(gemini)
    return ["teacher.kind=gemini"] + [f"teacher.gemini.{k}={v}" for k, v in base.items()]


def gemini_recipe(fake, **gemini):
    """The default recipe with `gemini_overrides(fake, **gemini)`."""
    from mlx_distill.recipe import load_recipe

    return load_recipe(None, gemini_overrides(fake, **gemini))
