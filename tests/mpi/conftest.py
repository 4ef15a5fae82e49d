"""MPI tests run two ways:

    mpiexec -n 2 .venv/bin/python -m pytest --with-mpi tests/mpi     # the collectives, on 2 ranks
    mpiexec -n 4 .venv/bin/python -m pytest --with-mpi tests/mpi     # the same on 4 (oversubscribed)
    .venv/bin/python -m pytest tests/mpi                             # unit tests + jobs launched by mpiexec

Tests marked `mpi` need --with-mpi (skipped otherwise). Tests that launch their own mpiexec are marked
`mpi_skip`: they run in the plain run, never inside an MPI job.
"""
