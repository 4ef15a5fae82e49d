import numpy as np
import pytest

from disttrain.data import load_char_corpus
from disttrain.data.chars import UNK_CHAR

TEXT = "hello world, hello data!\n" * 8  # 200 characters


def _joined(corpus):
    return np.concatenate([corpus.train, corpus.valid, corpus.test])


def test_split_is_contiguous_and_sized():
    corpus = load_char_corpus(TEXT, split=(0.8, 0.1, 0.1))
    assert (corpus.train.size, corpus.valid.size, corpus.test.size) == (160, 20, 20)
    assert "".join(corpus.vocab.decode(_joined(corpus))) == TEXT
    assert all(part.dtype == np.int64 for part in (corpus.train, corpus.valid, corpus.test))


def test_vocab_is_deterministic_by_frequency_then_char():
    corpus = load_char_corpus("abcabcab c", split=(1.0, 0.0, 0.0))
    assert corpus.vocab.tokens == ["a", "b", "c", " "]  # a:3 b:3 c:3 then ' ':1; ties by code point
    assert load_char_corpus("abcabcab c", split=(1.0, 0.0, 0.0)).vocab == corpus.vocab


def test_non_ascii_characters_kept_or_mapped():
    text = "naïve café " * 20
    assert "ï" in load_char_corpus(text).vocab
    mapped = load_char_corpus(text, ascii_only=True)
    assert "ï" not in mapped.vocab and UNK_CHAR in mapped.vocab
    assert "".join(mapped.vocab.decode(_joined(mapped))) == text.replace("ï", UNK_CHAR).replace("é", UNK_CHAR)


def test_reads_a_path(tmp_path):
    file = tmp_path / "t.txt"
    file.write_text(TEXT, encoding="utf-8")
    assert np.array_equal(_joined(load_char_corpus(file)), _joined(load_char_corpus(TEXT)))


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_char_corpus(tmp_path / "nope.txt")


@pytest.mark.parametrize("split, match", [
    ((0.9, 0.1), "three"),
    ((0.9, 0.2, -0.1), "non-negative"),
    ((0.5, 0.2, 0.2), "sum to 1"),
])
def test_bad_split_fractions(split, match):
    with pytest.raises(ValueError, match=match):
        load_char_corpus(TEXT, split=split)


def test_text_too_short_for_split():
    with pytest.raises(ValueError, match="too short"):
        load_char_corpus("abc", split=(0.9, 0.05, 0.05))


def test_split_sizes_survive_float_rounding():
    corpus = load_char_corpus("x" * 100, split=(0.29, 0.71, 0.0))
    assert (corpus.train.size, corpus.valid.size, corpus.test.size) == (29, 71, 0)


def test_zero_fraction_gives_empty_part():
    corpus = load_char_corpus(TEXT, split=(0.9, 0.1, 0.0))
    assert corpus.test.size == 0 and corpus.valid.size == 20
