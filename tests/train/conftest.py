"""Fixtures for training tests: a few KB of generated text and tiny char-level jobs that train in milliseconds."""
import numpy as np
import pytest

from disttrain.train.jobspec import loads_job

WORDS = ("the a cat dog sat on mat ran far and then it was good bad big small red fox jumps over lazy "
         "quick brown end begin loop step time").split()


def make_text(n_chars=3000, seed=0):
    """Pseudo-sentences of a small vocabulary: learnable structure, deterministic."""
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < n_chars:
        sentence = " ".join(WORDS[k] for k in rng.integers(0, len(WORDS), rng.integers(3, 9))) + ".\n"
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(make_text())
    return path


TINY_JOB = """
[model]
hidden = {hidden}
layers = {layers}
dropout = {dropout}
[data]
kind = "chars"
path = "{path}"
batch_size = 4
bptt = 8
[optim]
kind = "{optim}"
lr = {lr}
clip_norm = 1.0
[train]
epochs = {epochs}
log_every = 1
checkpoint_every = 0
seed = 3
"""


@pytest.fixture
def tiny_job(text_file):
    """tiny_job(*overrides, **fields) -> JobSpec of a tiny char-level LSTM on text_file."""
    def make(*overrides, hidden=16, layers=1, dropout=0.0, optim="adam", lr=0.01, epochs=1):
        text = TINY_JOB.format(hidden=hidden, layers=layers, dropout=dropout, path=text_file, optim=optim,
                               lr=lr, epochs=epochs)
        return loads_job(text, overrides, source=str(text_file.parent / "tiny.toml"))
    return make
