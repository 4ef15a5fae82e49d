"""Corpus: the three id streams of a language-modelling data set and the vocabulary behind them."""
from dataclasses import dataclass

import numpy as np

from disttrain.data.vocab import Vocabulary

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Corpus:
    """train, valid, test: np.int64 arrays of shape (n_tokens,), ids into vocab."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: Vocabulary

    def __post_init__(self):
        for name in SPLITS:
            ids = getattr(self, name)
            if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype != np.int64:
                raise TypeError(f"Corpus.{name} must be a 1-D np.int64 array")
            if ids.size and (ids.min() < 0 or ids.max() >= len(self.vocab)):
                raise ValueError(f"Corpus.{name} has ids outside [0, {len(self.vocab)})")

    def split(self, name):
        """The id stream called name ("train", "valid" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def __repr__(self):
        sizes = ", ".join(f"{n}={getattr(self, n).size}" for n in SPLITS)
        return f"Corpus({sizes}, vocab={len(self.vocab)})"
