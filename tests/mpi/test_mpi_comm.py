"""The communicator's collectives on 2+ ranks (run under mpiexec with --with-mpi)."""
import numpy as np
import pytest

from disttrain.parallel import world
from disttrain.parallel.strategy import DataParallelStrategy

pytestmark = pytest.mark.mpi(min_size=2)


def test_allreduce_iallreduce_bcast_allgather():
    comm = world()
    r, n = comm.rank, comm.size
    a = np.full(5, r + 1.0)
    comm.Allreduce(a)
    b = np.arange(1000, dtype=np.float32) * (r + 1)
    handle = comm.Iallreduce(b)
    while not handle.test():
        pass
    handle.wait()
    c = np.arange(4.0) if r == 0 else np.zeros(4)
    comm.Bcast(c, root=0)
    table = comm.Allgather(np.array([r, 10 * r], dtype=np.int64))
    peak = comm.Allreduce(np.array([float(r)]), op="max")
    np.testing.assert_array_equal(a, n * (n + 1) / 2)
    np.testing.assert_array_equal(b, np.arange(1000, dtype=np.float32) * (n * (n + 1) / 2))
    np.testing.assert_array_equal(c, np.arange(4.0))
    np.testing.assert_array_equal(table, [[k, 10 * k] for k in range(n)])
    assert peak[0] == n - 1


def test_split_into_sub_communicators():
    comm = world()
    sub = comm.Split(color=comm.rank % 2)
    total = sub.Allreduce(np.array([float(comm.rank)]))
    mine = [k for k in range(comm.size) if k % 2 == comm.rank % 2]
    assert sub.size == len(mine) and sub.rank == mine.index(comm.rank)
    assert total[0] == sum(mine)


def test_strategy_reductions_and_shards():
    strategy = DataParallelStrategy(world())
    n, r = strategy.world_size, strategy.rank
    mean = strategy.reduce_mean(float(r))
    sums = strategy.reduce_sum([1.0, float(r)])
    streams = np.arange(3 * 4 * n).reshape(3, 4 * n)
    mine = strategy.shard(streams)
    gathered = world().Allgather(np.ascontiguousarray(mine))
    strategy.barrier()
    assert mean == pytest.approx((n - 1) / 2) and sums == [n, n * (n - 1) / 2]
    assert strategy.is_main == (r == 0) and mine.shape == (3, 4)
    np.testing.assert_array_equal(np.concatenate(list(gathered), axis=1), streams)
