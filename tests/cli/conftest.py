"""Fixtures for CLI tests: a tiny job file (default corpus, or --set data.kind=chars) and a small text file."""
import numpy as np
import pytest

TINY_JOB = """
[model]
hidden = 16
layers = 2
dropout = 0.1
[data]
kind = "default_corpus"
max_bytes = 4000
batch_size = 4
bptt = 8
[optim]
kind = "adam"
lr = 0.01
clip_norm = 1.0
[train]
epochs = 1
eval_every = 20
log_every = 5
checkpoint_every = 10
"""


@pytest.fixture
def text_file(tmp_path):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then ran far away from big dogs".split()
    text = " ".join(words[k] for k in rng.integers(0, len(words), 900))
    path = tmp_path / "tiny.txt"
    path.write_text(text[:4000] + "\n")
    return path


@pytest.fixture
def job_file(tmp_path):
    """A job file whose data is overridden on the command line (--set data.kind=chars ...)."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_JOB)
    return path
