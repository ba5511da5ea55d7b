"""Shared fixtures. The fast BLAS is loaded (backend.setup) before anything imports mlx.core."""

import pytest

from mlx_distill import backend

backend.setup()  # before any mlx import; importing mlx_distill is not relied on for it


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small SentencePiece tokenizer folder (`tiny.arithmetic_tokenizer`); test_text.py
    trains a larger one of its own under this name."""
    from tiny import arithmetic_tokenizer  # imports mlx.core: after backend.setup()

    return arithmetic_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def gemini_env(monkeypatch):
    """The environment of the Gemini tests: the fake's key (`tiny.GEMINI_KEY`) as
    GEMINI_API_KEY, no other key, base URL or API version, no proxy for the loopback fake."""
    from tiny import GEMINI_KEY

    monkeypatch.setenv("GEMINI_API_KEY", GEMINI_KEY)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_GEMINI_BASE_URL", raising=False)
    monkeypatch.delenv("GOOGLE_GENAI_API_VERSION", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
