"""The communicator's collectives on 2+ ranks (run under mpiexec with --with-mpi)."""
import numpy as np
import pytest

from disttrain.parallel import world
from disttrain.parallel.data_mode import DataParallelMode

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


def test_data_parallel_mode_reductions_and_shares():
    mode = DataParallelMode(world())
    n, r = mode.world_size, mode.rank
    mean, = mode.reduce([float(r)], "mean")
    sums = mode.reduce([1.0, float(r)])
    share = mode.train_share()
    streams = np.arange(3 * 4 * n).reshape(3, 4 * n)
    mine = streams[:, share.index * 4:(share.index + 1) * 4]
    gathered = world().Allgather(np.ascontiguousarray(mine))
    mode.barrier()
    assert mean == pytest.approx((n - 1) / 2) and sums == [n, n * (n - 1) / 2]
    assert mode.is_main == (r == 0) and (share.index, share.count) == (r, n)
    np.testing.assert_array_equal(np.concatenate(list(gathered), axis=1), streams)


class _HostBackedDeviceArray:
    """A CuPy stand-in (NumPy memory with get/set and __cuda_array_interface__): takes the host-staging path."""

    def __init__(self, values):
        self.values = np.array(values)
        self.shape, self.dtype, self.nbytes = self.values.shape, self.values.dtype, self.values.nbytes

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False), "version": 3}

    def get(self, out=None):
        out[...] = self.values
        return out

    def set(self, host):
        self.values[...] = host


def test_point_to_point_ring_blocking_and_nonblocking():
    comm = world()
    r, n = comm.rank, comm.size
    right, left = (r + 1) % n, (r - 1) % n
    got = np.empty(3, dtype=np.int64)
    pending = comm.Irecv(got, source=left, tag=5)
    sent = comm.Isend(np.array([r, 2 * r, 7], dtype=np.int64), dest=right, tag=5)
    pending.wait()
    sent.wait()
    # blocking, ordered so that no rank waits on a send its neighbour has not posted yet
    device = _HostBackedDeviceArray(np.zeros((2, 2)))
    if r % 2 == 0:
        comm.Send(_HostBackedDeviceArray(np.full((2, 2), float(r))), dest=right, tag=9)
        comm.Recv(device, source=left, tag=9)
    else:
        comm.Recv(device, source=left, tag=9)
        comm.Send(_HostBackedDeviceArray(np.full((2, 2), float(r))), dest=right, tag=9)
    np.testing.assert_array_equal(got, [left, 2 * left, 7])
    np.testing.assert_array_equal(device.values, np.full((2, 2), float(left)))


def test_object_collectives_over_bounded_buffer_calls():
    comm = world()
    r, n = comm.rank, comm.size
    mine = {"rank": r, "names": ["w"] * r, "shape": (r, 2)}
    assert comm.allgather_object(mine) == [{"rank": k, "names": ["w"] * k, "shape": (k, 2)} for k in range(n)]
    gathered = comm.gather_object(mine, root=n - 1)
    assert gathered == ([{"rank": k, "names": ["w"] * k, "shape": (k, 2)} for k in range(n)] if r == n - 1 else None)
    assert comm.bcast_object({"from": r, "big": "x" * 100_000} if r == 0 else None) == {"from": 0, "big": "x" * 100_000}


def test_sub_communicators_know_their_world_ranks_and_names():
    comm = world()
    sub = comm.Split(color=comm.rank % 2)
    assert sub.world_ranks == tuple(k for k in range(comm.size) if k % 2 == comm.rank % 2)
    assert sub.name.startswith("world/") and sub.name.endswith(f":{comm.rank % 2}")
    dup = comm.Dup()
    assert dup.world_ranks == tuple(range(comm.size)) and dup.Allreduce(np.array([1.0]))[0] == comm.size
