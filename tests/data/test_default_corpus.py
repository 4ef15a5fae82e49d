import numpy as np

from disttrain.data import default_corpus_text, load_default_corpus
from disttrain.data.default_corpus import SKIP_DIRS, stdlib_sources

SMALL = 200_000  # bytes: enough to exercise everything, fast to build twice


def test_sources_sorted_and_skip_test_dirs():
    sources = stdlib_sources()
    assert sources == sorted(sources) and sources
    assert all(name.endswith(".py") for name in sources)
    assert not any(part in SKIP_DIRS for name in sources for part in name.split("/")[:-1])


def test_text_is_deterministic_and_capped():
    text = default_corpus_text(SMALL)
    assert text == default_corpus_text(SMALL)
    size = len(text.encode("utf-8"))
    assert SMALL - 20_000 < size <= SMALL  # cut on a line break inside the last file, so close to the cap
    assert text.endswith("\n")


def test_tiny_cap_still_gives_whole_lines():
    text = default_corpus_text(500)
    assert 0 < len(text.encode("utf-8")) <= 500 and text.endswith("\n")


def test_default_size_is_about_two_megabytes():
    size = len(default_corpus_text().encode("utf-8"))
    assert 1_900_000 < size <= 2_000_000


def test_corpus_and_split_are_deterministic_with_small_vocab():
    first, second = load_default_corpus(SMALL), load_default_corpus(SMALL)
    assert first.vocab == second.vocab
    for name in ("train", "valid", "test"):
        np.testing.assert_array_equal(first.split(name), second.split(name))
    assert len(first.vocab) <= 100  # printable ASCII, whitespace and one unknown symbol at most
    assert first.train.size > 0.85 * (first.train.size + first.valid.size + first.test.size)
