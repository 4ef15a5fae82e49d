"""Fixtures for training tests: tiny char-level jobs on generated text (tests/conftest.py) that train in milliseconds."""
import pytest

from disttrain.train.jobspec import loads_job

@pytest.fixture
def text_file(tmp_path, make_text):
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
