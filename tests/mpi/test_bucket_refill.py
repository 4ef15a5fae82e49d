"""A bucket shared by parameters that got a gradient this step and parameters that did not: the missing slots
are refilled every step (zeros, count 0), so a parameter used last step and unused now ends with no gradient,
as in one process; and close() ends the progress thread (from mutation testing). Under mpiexec --with-mpi."""
import threading

import numpy as np
import pytest

import disttrain as dt
import disttrain.nn.functional as F
from disttrain import nn
from disttrain.parallel import DataParallel, world

pytestmark = pytest.mark.mpi(min_size=2)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.side = nn.Linear(6, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x, use_side):
        h = self.body(x).tanh()
        return self.head(h) + self.side(h) if use_side else self.head(h)


@pytest.mark.parametrize("sync", ["backward", "deferred"])
def test_slots_of_parameters_without_gradient_are_refilled_every_step(sync):
    comm = world()
    rng = np.random.default_rng(1)
    dt.manual_seed(0)
    model = TwoHeads().double()
    opt = dt.optim.SGD(model.parameters(), lr=0.1)
    dp = DataParallel(model, comm, bucket_mb=1.0, optimizer=opt, sync=sync)      # one bucket for all six
    assert len(dp.reducer.buckets) == 1
    grads = []
    try:
        for use_side in (True, False):
            x, y = rng.standard_normal((2, 4)), rng.integers(0, 3, 2)
            opt.zero_grad()
            F.cross_entropy(dp(dt.tensor(x), use_side), dt.tensor(y)).backward()
            dp.synchronize()                    # sync="backward": a no-op, the gradients are averaged already
            grads.append({n: p.grad is not None for n, p in model.named_parameters()})
    finally:
        dp.close()
    assert all(grads[0].values())
    assert grads[1] == {"body.weight": True, "body.bias": True, "side.weight": False, "side.bias": False,
                        "head.weight": True, "head.bias": True}


def progress_threads():
    return [t for t in threading.enumerate() if t.name == "disttrain-mpi-progress" and t.is_alive()]


def test_close_ends_the_progress_thread():
    before = len(progress_threads())
    dt.manual_seed(0)
    dp = DataParallel(nn.Linear(3, 2), world(), progress="thread", overlap=True)
    started = len(progress_threads()) - before
    dp.close()
    assert len(progress_threads()) == before
    assert started == (1 if dp.reducer.progress == "thread" else 0)
