"""The collectives of sharded optimizer state, Ireduce_scatter_block and Iallgather: results, size checks, and
waits bounded by the watchdog like every other (a rank that never arrives is reported, not waited for).
Under mpiexec --with-mpi."""
import time

import numpy as np
import pytest

from disttrain.parallel import world
from disttrain.parallel.comm import _LOCK, Communicator
from disttrain.parallel.watchdog import Watchdog, WatchdogTimeout

pytestmark = pytest.mark.mpi(min_size=2)


def test_reduce_scatter_block_and_allgather():
    comm = world()
    r, n = comm.rank, comm.size
    rows = np.arange(n * 3, dtype=np.float64).reshape(n, 3) * (r + 1)
    mine = np.empty(3)
    comm.Ireduce_scatter_block(rows, mine).wait()
    everyone = np.empty(n * 2, dtype=np.float32)
    comm.Iallgather(np.array([r, -r], dtype=np.float32), everyone).wait()
    np.testing.assert_array_equal(mine, np.arange(r * 3, r * 3 + 3) * n * (n + 1) / 2)
    np.testing.assert_array_equal(everyone, [v for k in range(n) for v in (k, -k)])


def test_block_sizes_are_checked_before_mpi_sees_the_buffers():
    comm = world()
    with pytest.raises(ValueError, match=rf"Ireduce_scatter_block: needs {comm.size} x 3 elements of float64 "
                                         rf"\(one block per rank\), got 5 of float64"):
        comm.Ireduce_scatter_block(np.zeros(5), np.zeros(3))
    with pytest.raises(ValueError, match=rf"Iallgather: needs {comm.size} x 2 elements of float32"):
        comm.Iallgather(np.zeros(2, dtype=np.float32), np.zeros(2 * comm.size))


@pytest.mark.parametrize("call", ["reduce-scatter", "allgather"])
def test_a_rank_missing_from_the_collective_is_reported(call):
    """The last rank joins 3 s late; the others' waits end after 0.5 s with the watchdog's report naming it."""
    comm = world()
    watchdog = Watchdog(comm.Dup().mpi_comm, comm.rank, comm.size, _LOCK, timeout_s=0.5, abort=False, grace_s=1.0)
    sub = Communicator(comm.Dup().mpi_comm, name="test", watchdog=watchdog)
    late = comm.size - 1
    if comm.rank == late:
        time.sleep(3.0)
    if call == "reduce-scatter":
        handle = sub.Ireduce_scatter_block(np.ones(comm.size * 4), np.empty(4), what="reduce-scatter of bucket 0")
    else:
        handle = sub.Iallgather(np.ones(4), np.empty(comm.size * 4), what="allgather of bucket 0")
    message = None
    try:
        handle.wait()
    except WatchdogTimeout as exc:
        message = str(exc)
    while not handle.test():             # every rank has started the collective by now
        pass
    comm.Barrier()
    time.sleep(0.5)
    while watchdog._receive_position() is not None:     # the reports still in flight
        pass
    comm.Barrier()
    if comm.rank != late:
        assert message is not None and f"{call} of bucket 0 on test" in message
        assert f"not arrived: rank {late}" in message
