"""Vocabulary: a fixed, deterministic mapping between tokens and integer ids.

The id order is part of a trained model (row i of the embedding belongs to token i), so it must
not depend on dict or hash order: special tokens come first in the order given, then every other
token by frequency (most frequent first), ties broken by the token itself. Two processes (two
ranks, or a job and its resumed self) that build a vocabulary from the same stream get the same ids.
"""
from collections import Counter

import numpy as np

EOS = "<eos>"


class Vocabulary:
    """Token <-> id mapping.

    tokens: the tokens in id order (id i is tokens[i]); no duplicates.
    unk: optional token (must be among tokens) that encode() uses for unknown tokens; without one
        an unknown token is an error, which is what a closed-vocabulary corpus such as PTB wants.
    """

    def __init__(self, tokens, unk=None):
        self._tokens = [str(t) for t in tokens]
        self._index = {t: i for i, t in enumerate(self._tokens)}
        if len(self._index) != len(self._tokens):
            dupes = sorted(t for t, n in Counter(self._tokens).items() if n > 1)
            raise ValueError(f"vocabulary tokens must be unique; duplicated: {dupes[:10]}")
        if unk is not None and unk not in self._index:
            raise ValueError(f"unknown-token {unk!r} is not in the vocabulary")
        self.unk = unk

    @classmethod
    def build(cls, stream, specials=(), unk=None, max_size=None):
        """Build from an iterable of tokens.

        specials: tokens that get the first ids in the given order (e.g. (EOS,) makes <eos> id 0),
            whether or not they occur in the stream.
        unk: token for unknown words; added after the specials if the stream never contains it.
        max_size: keep at most this many tokens in all (specials included); the rest are dropped,
            so encode() maps them to unk (unk is then required).
        """
        counts = Counter(stream)
        head = list(dict.fromkeys(specials))
        if unk is not None and unk not in head:
            head.append(unk)
        taken = set(head)
        rest = sorted((t for t in counts if t not in taken), key=lambda t: (-counts[t], t))
        if max_size is not None:
            if unk is None and len(head) + len(rest) > max_size:
                raise ValueError("max_size would drop tokens; give an unk token to map them to")
            rest = rest[: max(0, max_size - len(head))]
        return cls(head + rest, unk=unk)

    def __len__(self):
        return len(self._tokens)

    def __contains__(self, token):
        return token in self._index

    def __getitem__(self, token):
        """The id of token (KeyError if absent; unk is not applied here)."""
        return self._index[token]

    def __eq__(self, other):
        return isinstance(other, Vocabulary) and self._tokens == other._tokens and self.unk == other.unk

    def __repr__(self):
        return f"Vocabulary(size={len(self)}, unk={self.unk!r}, head={self._tokens[:5]!r})"

    @property
    def tokens(self):
        """The tokens in id order (a copy)."""
        return list(self._tokens)

    @property
    def eos_id(self):
        """The id of <eos>; KeyError if this vocabulary has none (e.g. a character vocabulary)."""
        return self._index[EOS]

    def encode(self, tokens):
        """Iterable of tokens -> np.int64 array of shape (len(tokens),)."""
        index = self._index
        if self.unk is not None:
            unk_id = index[self.unk]
            return np.array([index.get(t, unk_id) for t in tokens], dtype=np.int64)
        try:
            return np.array([index[t] for t in tokens], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"token {exc.args[0]!r} is not in the vocabulary (size {len(self)}) "
                           "and it has no unk token") from None

    def decode(self, ids):
        """Integer ids of any shape -> flat list of tokens."""
        flat = np.asarray(ids).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"ids must lie in [0, {len(self)}); got range [{flat.min()}, {flat.max()}]")
        return [self._tokens[i] for i in flat.tolist()]

    def to_dict(self):
        """Plain-JSON form for job checkpoints: {"tokens": [...], "unk": str | None}."""
        return {"tokens": list(self._tokens), "unk": self.unk}

    @classmethod
    def from_dict(cls, state):
        """Inverse of to_dict()."""
        if not isinstance(state, dict) or not isinstance(state.get("tokens"), list):
            raise ValueError("a vocabulary state must be a dict with a 'tokens' list (see to_dict())")
        return cls(state["tokens"], unk=state.get("unk"))
