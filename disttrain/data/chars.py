"""Character-level text corpus: one token per Unicode character, a contiguous train/valid/test split.

Encoding works on code points with NumPy (text -> UTF-32 -> uint32 array -> lookup table) rather
than a Python loop, so megabytes of text encode in milliseconds. The vocabulary is built from the
whole text, not the train part alone: the character set is not a learned statistic, and a
character that first appears in valid would otherwise be unencodable.
"""
import math
import os
from pathlib import Path

import numpy as np

from disttrain.data.corpus import Corpus
from disttrain.data.vocab import Vocabulary

DEFAULT_SPLIT = (0.9, 0.05, 0.05)
UNK_CHAR = "\ufffd"  # Unicode REPLACEMENT CHARACTER: the conventional "unknown character"


def code_points(text):
    """str of n characters -> np.uint32 array of shape (n,) with their code points."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def char_vocabulary(points):
    """Vocabulary of the characters in points (np.uint32, shape (n,)): by frequency desc, then character."""
    unique, counts = np.unique(points, return_counts=True)
    order = np.lexsort((unique, -counts))  # last key is primary: count desc, then code point asc
    return Vocabulary([chr(int(c)) for c in unique[order]])


def encode_chars(vocab, points):
    """np.uint32 code points, shape (n,) -> np.int64 ids, shape (n,); KeyError on a character not in vocab."""
    table_points = np.array([ord(t) for t in vocab.tokens], dtype=np.uint32)
    sort = np.argsort(table_points)
    sorted_points = table_points[sort]
    pos = np.searchsorted(sorted_points, points).clip(0, len(sorted_points) - 1)
    missing = sorted_points[pos] != points
    if missing.any():
        raise KeyError(f"character {chr(int(points[missing][0]))!r} is not in the vocabulary")
    return sort[pos].astype(np.int64)


def to_ascii(text, unk=UNK_CHAR):
    """text with every non-ASCII character replaced by unk (keeps a code vocabulary small)."""
    points = code_points(text)
    if not (points > 127).any():
        return text
    points = np.where(points > 127, np.uint32(ord(unk)), points)
    return points.astype("<u4").tobytes().decode("utf-32-le")


def split_sizes(n, split):
    """Sizes (n_train, n_valid, n_test) of a contiguous split of n items by the fractions in split."""
    fractions = tuple(float(f) for f in split)
    if len(fractions) != 3 or any(f < 0 or not math.isfinite(f) for f in fractions):
        raise ValueError(f"split must be three non-negative fractions (train, valid, test); got {split!r}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must sum to 1; {split!r} sums to {sum(fractions)}")
    # The epsilon keeps e.g. 100 * 0.29 = 28.999999999999996 from flooring to 28.
    n_train, n_valid = (int(n * f + 1e-9) for f in fractions[:2])
    sizes = (n_train, n_valid, n - n_train - n_valid)
    # A part asked for but left empty would only fail later, far from the cause.
    if any(size == 0 and f > 0 for size, f in zip(sizes, fractions)):
        raise ValueError(f"text of {n} characters is too short for split {split!r}: sizes {sizes}")
    return sizes


def load_char_corpus(text_or_path, split=DEFAULT_SPLIT, ascii_only=False):
    """Character corpus from a text (str) or a UTF-8 file (pathlib.Path or any os.PathLike).

    A plain str is always the text itself, never a file name, so no string is ever guessed at.
    split: fractions (train, valid, test) of the characters, taken contiguously in that order.
    ascii_only: map every non-ASCII character to UNK_CHAR first.
    Returns a Corpus of np.int64 id arrays with shapes (n_train,), (n_valid,), (n_test,).
    """
    text = _read_text(text_or_path)
    if ascii_only:
        text = to_ascii(text)
    points = code_points(text)
    n_train, n_valid, _ = split_sizes(points.size, split)
    vocab = char_vocabulary(points)
    ids = encode_chars(vocab, points)
    return Corpus(train=ids[:n_train], valid=ids[n_train:n_train + n_valid], test=ids[n_train + n_valid:],
                  vocab=vocab)


def _read_text(text_or_path):
    if isinstance(text_or_path, str):
        return text_or_path
    if isinstance(text_or_path, os.PathLike):
        path = Path(text_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        return path.read_text(encoding="utf-8")
    raise TypeError(f"expected a str of text or a path (os.PathLike); got {type(text_or_path).__name__}")
