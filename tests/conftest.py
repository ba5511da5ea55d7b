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
