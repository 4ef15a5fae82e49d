"""ShardedOptimizer.clip_grad_norm_ (ZeRO stage 2: each rank holds only its slice of the averaged gradients)
equals nn.utils.clip_grad_norm_ over the whole model in one process for every order it takes: positive, inf,
-inf, 0 (the gradients with a nonzero element), negative and NaN, in float64; the returned norm and the
clipped update (one SGD step at lr 1) both. Under mpiexec --with-mpi (make test runs 2 and 4 ranks)."""
import math

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.nn.utils import clip_grad_norm_
from disttrain.parallel import DataParallel, world

from test_sharded_optimizer import awkward, batches, loss_of, share

pytestmark = pytest.mark.mpi(min_size=2)

ORDERS = [2.0, 1.0, 3.5, math.inf, -math.inf, 0.0, -1.0, -0.5, math.nan]
MAX_NORM = 1e-3                     # below every positive-order norm here: those steps are clipped


def dense():
    """Every gradient element nonzero (so negative orders are not simply 0); sizes no rank count divides."""
    dt.manual_seed(5)
    return nn.Sequential(nn.Embedding(11, 5), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 11)).to(dtype=dt.float64)


def one_step(model, x, y, clip, comm=None):
    """The gradient-norm clip returned by clip(model or dp) and the parameters after one SGD step at lr 1."""
    opt = dt.optim.SGD(model.parameters(), lr=1.0)
    dp = DataParallel(model, comm, optimizer=opt, shard_optimizer=2, bucket_mb=0.0005) if comm else None
    try:
        (dp.optimizer if dp else opt).zero_grad()
        loss_of(dp or model, x, y).backward()
        total = clip(dp.optimizer if dp else model)
        (dp.optimizer if dp else opt).step()
        return total, [p.data.copy() for p in model.parameters()]
    finally:
        if dp:
            dp.close()


@pytest.mark.parametrize("make", [dense, lambda: awkward(dt.float64)], ids=["dense", "awkward"])
@pytest.mark.parametrize("order", ORDERS)
def test_sharded_clip_equals_one_process_for_every_order(make, order):
    comm = world()
    x, y = batches(1, seed=7)[0]
    want_total, want = one_step(make(), x, y, lambda m: clip_grad_norm_(m.parameters(), MAX_NORM, order))
    got_total, got = one_step(make(), share(x, comm), share(y, comm),
                              lambda opt: opt.clip_grad_norm_(MAX_NORM, order), comm)
    if math.isnan(want_total):
        assert math.isnan(got_total)
    else:
        assert got_total == pytest.approx(want_total, rel=1e-12, abs=0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


def test_a_norm_type_that_is_not_a_number_is_refused_in_one_line():
    comm = world()
    model = dense()
    dp = DataParallel(model, comm, optimizer=dt.optim.SGD(model.parameters(), lr=1.0), shard_optimizer=2)
    try:
        x, y = batches(1)[0]
        loss_of(dp, share(x, comm), share(y, comm)).backward()
        with pytest.raises(ValueError, match=r"^ShardedOptimizer.clip_grad_norm_: norm_type='fro' is not a number"):
            dp.optimizer.clip_grad_norm_(1.0, "fro")
    finally:
        dp.close()
