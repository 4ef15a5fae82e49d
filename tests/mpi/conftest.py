"""MPI tests run two ways:

    mpiexec -n 2 .venv/bin/python -m pytest --with-mpi tests/mpi     # the collectives, on 2 ranks
    mpiexec -n 4 .venv/bin/python -m pytest --with-mpi tests/mpi     # the same on 4 (oversubscribed)
    .venv/bin/python -m pytest tests/mpi                             # unit tests + jobs launched by mpiexec

Tests marked `mpi` need --with-mpi (skipped otherwise). Tests that launch their own mpiexec are marked
`mpi_skip`: they run in the plain run, never inside an MPI job.
"""
import pytest

from disttrain.parallel import world
from disttrain.train.jobspec import loads_job


@pytest.fixture
def char_job(mpi_tmp_path, make_text):
    """char_job(template, n_chars) -> job(*overrides) -> JobSpec: `template` (TOML with a {path} placeholder)
    on a generated corpus of n_chars characters that rank 0 writes and every rank reads."""
    def make(template, n_chars):
        path = mpi_tmp_path / "tiny.txt"
        if world().rank == 0:
            path.write_text(make_text(n_chars))
        world().Barrier()
        return lambda *overrides: loads_job(template.format(path=path), overrides,
                                            source=str(mpi_tmp_path / "tiny.toml"))
    return make
