import gzip

import numpy as np
import pytest

from disttrain.data import EOS, PTB_ENV_VAR, default_ptb_path, load_ptb
from disttrain.data.ptb import ptb_file

# Token counts with <eos> from the README beside the standard files.
PTB_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}
PTB_LINES = {"train": 42_068, "valid": 3_370, "test": 3_761}


@pytest.fixture(scope="module")
def ptb():
    path = default_ptb_path()
    if not path.is_dir():
        pytest.skip(f"PTB not found at {path} (set {PTB_ENV_VAR})")
    return load_ptb(path)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_real_token_counts(ptb, split):
    ids = ptb.split(split)
    assert ids.dtype == np.int64 and ids.shape == (PTB_TOKENS[split],)
    assert np.count_nonzero(ids == ptb.vocab.eos_id) == PTB_LINES[split]
    assert ids[-1] == ptb.vocab.eos_id


def test_real_vocab_has_10000_words(ptb):
    assert len(ptb.vocab) == 10_000
    assert ptb.vocab.eos_id == 0
    assert "<unk>" in ptb.vocab and "N" in ptb.vocab


def test_real_eos_follows_each_line(ptb):
    with gzip.open(ptb_file(default_ptb_path(), "valid"), "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    eos_positions = np.flatnonzero(ptb.valid == ptb.vocab.eos_id)
    line_ends = np.cumsum([len(line.split()) + 1 for line in lines]) - 1
    np.testing.assert_array_equal(eos_positions, line_ends)
    first = lines[0].split() + [EOS]
    assert ptb.vocab.decode(ptb.valid[: len(first)]) == first


def _write_ptb(directory, train, valid, test):
    directory.mkdir(exist_ok=True)
    (directory / "ptb.train.txt").write_text(train)
    with gzip.open(directory / "ptb.valid.txt.gz", "wt", encoding="utf-8") as f:
        f.write(valid)
    (directory / "ptb.test.txt").write_text(test)
    return directory


def test_small_corpus_eos_and_train_only_vocab(tmp_path):
    path = _write_ptb(tmp_path, " a b a \n c a\n", " b a\n", " c\n")
    corpus = load_ptb(path, expected_vocab_size=None)
    assert corpus.vocab.tokens == [EOS, "a", "b", "c"]
    assert corpus.vocab.decode(corpus.train) == ["a", "b", "a", EOS, "c", "a", EOS]
    assert corpus.vocab.decode(corpus.valid) == ["b", "a", EOS]
    assert corpus.vocab.decode(corpus.test) == ["c", EOS]


def test_gz_preferred_over_txt(tmp_path):
    path = _write_ptb(tmp_path, "a\n", "a\n", "a\n")
    (path / "ptb.valid.txt").write_text("this file is ignored\n")
    assert load_ptb(path, expected_vocab_size=None).valid.size == 2


def test_word_missing_from_train_is_reported(tmp_path):
    path = _write_ptb(tmp_path, "a\n", "a zebra\n", "a\n")
    with pytest.raises(ValueError, match="zebra"):
        load_ptb(path, expected_vocab_size=None)


def test_wrong_vocab_size_is_reported(tmp_path):
    path = _write_ptb(tmp_path, "a\n", "a\n", "a\n")
    with pytest.raises(ValueError, match="expected 10000"):
        load_ptb(path)


def test_missing_directory_names_file_env_var_and_source(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_ptb(tmp_path / "nowhere")
    message = str(err.value)
    assert "ptb.train.txt.gz" in message and "does not exist" in message
    assert PTB_ENV_VAR in message
    assert "simple-examples.tgz" in message


def test_missing_split_names_that_file(tmp_path):
    path = _write_ptb(tmp_path, "a\n", "a\n", "a\n")
    (path / "ptb.test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="ptb.test.txt"):
        load_ptb(path, expected_vocab_size=None)


def test_default_path_from_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(PTB_ENV_VAR, str(tmp_path))
    assert default_ptb_path() == tmp_path


def test_default_path_falls_back_to_shared_beside_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv(PTB_ENV_VAR, raising=False)
    (tmp_path / "project").mkdir()
    (tmp_path / "shared" / "data" / "ptb").mkdir(parents=True)      # there: it wins over the checkout's
    monkeypatch.chdir(tmp_path / "project")
    assert default_ptb_path() == tmp_path / "shared" / "data" / "ptb"
