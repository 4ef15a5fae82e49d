"""How the Reducer drives communication, as its docstring says: a progress thread only where it can help (more
than one rank, overlapped reduction, MPI granting threads, progress="thread"), and overlap="auto" trials only
with more than one rank (from mutation testing). Under mpiexec --with-mpi; tests/parallel/test_reducer_one_rank.py
has the one-rank case."""
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.parallel import world
from disttrain.parallel.buckets import Reducer
from disttrain.tensor.memory import MemoryMeter

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


@pytest.mark.parametrize("overlap", [True, False])
def test_reduce_scatter_keeps_the_rows_of_a_few_buckets_alive(overlap):
    """Stage 2 drops each bucket's send rows once its reduce-scatter completes, with at most MAX_ROWS_IN_FLIGHT
    in flight: over a backward of 16 layers, one bucket each, the meter (which counts the rows and the received
    slices) sees less than a one-process backward that keeps every gradient; holding every bucket's rows until
    the end of backward, it saw more (the rows alone are the whole gradient, the slices 1/N more)."""
    dt.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(16)])
    x = dt.randn(2, 64)
    resident = list(model.parameters())

    def backward_peak():
        with MemoryMeter(resident=resident) as meter:
            model(x).sum().backward()
        for p in model.parameters():
            p.grad = None
        return meter.peak_bytes - meter.start_bytes

    keeping_every_gradient = backward_peak()
    reducer = Reducer(model.named_parameters(), world(), bucket_mb=64 * 64 * 4 / 2**20, overlap=overlap,
                      collective="reduce_scatter")
    try:
        assert len(reducer.buckets) == 16
        stage_two = backward_peak()
    finally:
        reducer.close()
    layer = 64 * 64 * 4
    assert stage_two < keeping_every_gradient - 2 * layer, (stage_two, keeping_every_gradient)
