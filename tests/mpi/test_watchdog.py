"""The watchdog's report exchange on 2+ ranks: a rank that times out learns where the live ranks wait."""
import time

import numpy as np
import pytest

from disttrain.parallel import world
from disttrain.parallel.comm import _LOCK
from disttrain.parallel.watchdog import Watchdog, WatchdogTimeout, operation

pytestmark = pytest.mark.mpi(min_size=2)


def test_a_time_out_names_the_rank_that_did_not_arrive_and_where_the_others_wait():
    comm = world()
    private = comm.Dup()                 # the watchdog's own channel, as world() makes one
    # rank 0 times out; the other early ranks (on 3+ ranks) would wait a minute, but hear of rank 0's time-out
    timeout = 0.5 if comm.rank == 0 else 60
    watchdog = Watchdog(private.mpi_comm, comm.rank, comm.size, _LOCK, timeout_s=timeout, abort=False, grace_s=2.0)
    sub = comm.Dup()
    late = comm.size - 1                 # joins the barrier only after the others have timed out
    if comm.rank == late:
        time.sleep(4.0)
    op = operation("test barrier", ("test", 1), tuple(range(comm.size)))
    with _LOCK:
        request = sub.mpi_comm.Ibarrier()
    handle = _Waitable(request)
    if comm.rank != late:
        with pytest.raises(WatchdogTimeout) as raised:
            watchdog.wait(handle, op)
        message = str(raised.value)
        if comm.rank == 0:
            assert message.startswith(f"[rank 0 of {comm.size}] watchdog: test barrier")
            assert "did not complete within 0.5 s" in message
        else:
            assert message.startswith(f"[rank {comm.rank} of {comm.size}] watchdog: rank 0 timed out in test barrier")
        assert f"not arrived: rank {late} (no answer within 2 s" in message
        others = [str(k) for k in range(comm.size - 1) if k != comm.rank]
        if others:
            assert "waiting in it too: rank" in message and all(k in message for k in others)
    else:
        watchdog.wait(handle, op)        # the others are in the barrier already: nothing to wait for
    while not handle.test():             # every rank has entered the barrier by now
        pass
    comm.Barrier()
    _drain(watchdog)


class _Waitable:
    def __init__(self, request):
        self.request, self.done = request, False

    def test(self):
        with _LOCK:
            self.done = self.done or self.request.Test()
        return self.done


def _drain(watchdog):
    """Receive the reports still in flight, so that no later test sees them."""
    time.sleep(0.5)
    while watchdog._receive_position() is not None:
        pass
    world().Barrier()
