"""Consistency rules and membership bookkeeping (pure logic, no sockets)."""
import numpy as np
import pytest

from disttrain.paramserver.consistency import Consistency, SyncRound
from disttrain.paramserver.membership import Membership


def test_read_rules():
    a, s, y = Consistency("async"), Consistency("ssp", 2), Consistency("sync")
    assert a.may_read(100, 0, 0)
    assert s.may_read(5, 3, 0) and not s.may_read(6, 3, 0) and s.may_read(6, None, 0)
    assert y.may_read(4, 0, 4) and not y.may_read(5, 4, 4)
    assert y.aggregates and not s.aggregates
    with pytest.raises(ValueError):
        Consistency("bsp")
    with pytest.raises(ValueError):
        Consistency("ssp", -1)


def test_sync_round_averages_and_waits_for_every_live_worker():
    r = SyncRound(0)
    r.add(1, {0: np.array([1.0, 2.0])})
    assert not r.complete([1, 2]) and r.complete([1])
    r.add(2, {0: np.array([3.0, 6.0])})
    assert r.complete([1, 2]) and not SyncRound(1).complete([])
    np.testing.assert_array_equal(r.mean()[0], [2.0, 4.0])


def test_membership_expires_silent_workers_only():
    m = Membership(timeout=1.0)
    m.join(1, b"a", clock=0, epoch=0, now=0.0)
    m.join(2, b"b", clock=3, epoch=1, now=0.0)
    m.join_observer(9, b"c")
    assert m.min_clock() == 0 and m.min_epoch() == 0
    m.touch(2, 0.9)
    assert m.expire(1.5) == [1] and m.live() == [2] and m.dropped == [1]
    assert m.min_clock() == 3 and 9 in m.observers
    assert m.join(2, b"z", clock=0, epoch=0, now=2.0).clock == 3         # a rejoin keeps the server's clock
    assert m.leave(2) and not m.leave(2) and m.min_clock() is None
