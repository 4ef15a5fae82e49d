"""How the Reducer drives communication, as its docstring says: a progress thread only where it can help (more
than one rank, overlapped reduction, MPI granting threads, progress="thread"), and overlap="auto" trials only
with more than one rank (from mutation testing). Under mpiexec --with-mpi; tests/parallel/test_reducer_one_rank.py
has the one-rank case."""
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.parallel import world
from disttrain.parallel.buckets import Reducer

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture
def named():
    dt.manual_seed(0)
    return list(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).named_parameters())


@pytest.mark.parametrize("progress", ["thread", "hooks"])
@pytest.mark.parametrize("overlap", [True, False, "auto"])
def test_progress_thread_only_where_it_can_help(named, progress, overlap):
    comm = world()
    reducer = Reducer(named, comm, bucket_mb=1e-4, progress=progress, overlap=overlap)
    try:
        wanted = progress == "thread" and overlap is not False and comm.size > 1 and comm.supports_threads()
        assert reducer.progress == ("thread" if wanted else "hooks")
        assert (reducer.choice is not None) == (overlap == "auto" and comm.size > 1)
    finally:
        reducer.close()
