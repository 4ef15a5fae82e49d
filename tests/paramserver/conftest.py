"""Fixtures for parameter-server tests (helpers live in ps_testing.py)."""
import pytest

from tiny_jobs import PARAMETER_SERVER, tiny_job


@pytest.fixture
def ps_job(tmp_path, make_text):
    """ps_job(*overrides, n_chars=3000, optim="adam", lr=0.01) -> (JobSpec, path of its TOML file)."""
    def make(*overrides, n_chars=3000, optim="adam", lr=0.01):
        text = tmp_path / "tiny.txt"
        text.write_text(make_text(n_chars))
        spec = tiny_job(*PARAMETER_SERVER, f'optim.kind="{optim}"', f"optim.lr={lr}", *overrides, text=text,
                        source=str(tmp_path / "tiny.toml"))
        path = tmp_path / "tiny.toml"
        path.write_text(spec.to_toml())
        return spec, path
    return make
