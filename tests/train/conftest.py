"""Fixtures for training tests: tiny char-level jobs on generated text (tests/conftest.py) that train in milliseconds."""
import pytest

from tiny_jobs import switches_to_transformer
from tiny_jobs import tiny_job as build_tiny_job


@pytest.fixture
def text_file(tmp_path, make_text):
    path = tmp_path / "tiny.txt"
    path.write_text(make_text())
    return path


@pytest.fixture
def tiny_job(text_file):
    """tiny_job(*overrides, **fields) -> JobSpec of a tiny char-level LSTM on text_file."""
    def make(*overrides, hidden=16, layers=1, dropout=0.0, optim="adam", lr=0.01, epochs=1):
        width = () if switches_to_transformer(overrides) else (f"model.hidden={hidden}",)
        fields = (*width, f"model.layers={layers}", f"model.dropout={dropout}",
                  f'optim.kind="{optim}"', f"optim.lr={lr}", f"train.epochs={epochs}")
        return build_tiny_job(*fields, *overrides, text=text_file, source=str(text_file.parent / "tiny.toml"))
    return make
