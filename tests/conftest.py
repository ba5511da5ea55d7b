"""Shared fixtures. Importing mlx_distill first loads the fast BLAS before mlx.core."""

import pytest

from mlx_distill import backend

backend.setup()  # the fast BLAS, before anything imports mlx.core


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small SentencePiece tokenizer folder (`tiny.arithmetic_tokenizer`); test_text.py
    trains a larger one of its own under this name."""
    from tiny import arithmetic_tokenizer  # imports mlx.core: after mlx_distill

    return arithmetic_tokenizer(tmp_path_factory.mktemp("tok"))
