"""Fixtures for CLI tests: a tiny job file (default corpus, or --set data.kind=chars) and a small text file."""
import numpy as np
import pytest

from tiny_jobs import tiny_job_toml

# the tiny job as these tests run it (their data is set on the command line: --set data.kind=chars ...)
CLI_SETTINGS = ("model.layers=2", "model.dropout=0.1", "train.eval_every=20", "train.log_every=5",
                "train.checkpoint_every=10", "train.seed=0")


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
    path.write_text(tiny_job_toml(*CLI_SETTINGS))
    return path
