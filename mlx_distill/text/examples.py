"""Tokenized training examples shared by the cache, the loader and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenizedExample:
    """One training sequence.

    tokens: (T,) int32 ids of the whole chat-formatted sequence.
    mask: (T,) bool, True where the token is a training target (the assistant's part).
    Position t of a model predicts tokens[t + 1]; its loss counts when mask[t + 1] is True.
    text: the source record (prompt, completion, ...), kept for the cache's text records.
    """

    tokens: np.ndarray
    mask: np.ndarray
    text: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int32)
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.tokens.shape != self.mask.shape or self.tokens.ndim != 1:
            raise ValueError(f"tokens {self.tokens.shape} and mask {self.mask.shape} must match")
