"""DataParallel's default, torch DDP's semantics: backward() returns with the gradients averaged over the ranks,
through one synchronisation at the end of each backward pass (disttrain.autograd.queue_callback), whatever the
overlap mode; synchronize() is then a no-op; misuse fails with a message. Under mpiexec --with-mpi.

Each rank computes the one-process reference itself and asserts only after its collectives are done.
"""
import numpy as np
import pytest

import disttrain as dt
import disttrain.nn.functional as F
from disttrain import nn
from disttrain.parallel import DataParallel, ModelMismatchError, trace, world

pytestmark = pytest.mark.mpi(min_size=2)

B = 8                                    # examples per rank


def mlp():
    dt.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def data(comm):
    rng = np.random.default_rng(11)
    return rng.standard_normal((comm.size * B, 4)), rng.integers(0, 3, comm.size * B)


def loss_of(model, x, y):
    return F.cross_entropy(model(dt.tensor(x)), dt.tensor(y))


def reference_grads(x, y, passes=1):
    model = mlp()
    for _ in range(passes):
        loss_of(model, x, y).backward()
    return [p.grad.data.copy() for p in model.parameters()]


def mine(comm, x, y):
    rows = slice(comm.rank * B, (comm.rank + 1) * B)
    return x[rows], y[rows]


@pytest.mark.parametrize("overlap,progress", [(True, "thread"), (True, "hooks"), (False, "thread"),
                                              ("auto", "thread")])
def test_backward_returns_with_the_gradients_averaged(overlap, progress):
    comm = world()
    x, y = data(comm)
    model = mlp()
    dp = DataParallel(model, comm, bucket_mb=1e-4, progress=progress, overlap=overlap)
    try:
        loss_of(dp, *mine(comm, x, y)).backward()
        pending, syncs = dp.pending(), dp.reducer.syncs
        grads = [p.grad for p in model.parameters()]
        dp.synchronize()                                 # a no-op now: no second round of collectives
        unchanged = [p.grad is g for p, g in zip(model.parameters(), grads)] + [dp.reducer.syncs == syncs]
    finally:
        dp.close()
    for name_grad, want in zip(grads, reference_grads(x, y)):
        np.testing.assert_allclose(name_grad.data, want, rtol=1e-12, atol=1e-15)
    assert not pending and syncs == 1 and all(unchanged)


def test_one_synchronisation_per_backward_pass():
    """Two backward passes without zero_grad (retain_graph) accumulate the two averaged gradients, one
    synchronisation each; synchronize() calls and no_sync passes add none."""
    comm = world()
    x, y = data(comm)
    model = mlp()
    dp = DataParallel(model, comm, bucket_mb=1e-4)
    tracer = trace.Tracer(rank=comm.rank)
    syncs = []
    try:
        with trace.tracing(tracer):
            loss = loss_of(dp, *mine(comm, x, y))
            loss.backward(retain_graph=True)
            syncs.append(dp.reducer.syncs)
            dp.synchronize()
            dp.synchronize()
            loss.backward()
            syncs.append(dp.reducer.syncs)
            got = [p.grad.data.copy() for p in model.parameters()]
            with dp.no_sync():
                loss_of(dp, *mine(comm, x, y)).backward()
            syncs.append(dp.reducer.syncs)
    finally:
        dp.close()
    spans = [name for name, *_ in tracer.spans]
    for g, want in zip(got, reference_grads(x, y, passes=2)):
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-15)
    assert syncs == [1, 2, 2] and spans.count("sync gradients") == 2


def test_deferred_sync_leaves_the_reductions_to_synchronize():
    comm = world()
    x, y = data(comm)
    model = mlp()
    opt = dt.optim.SGD(model.parameters(), lr=0.1)
    dp = DataParallel(model, comm, bucket_mb=1e-4, optimizer=opt, sync="deferred")
    try:
        loss_of(dp, *mine(comm, x, y)).backward()
        pending_after_backward, syncs_after_backward = dp.pending(), dp.reducer.syncs
        dp.synchronize()
        got = [p.grad.data.copy() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        state = (dp.pending(), dp.reducer.syncs)
    finally:
        dp.close()
    for g, want in zip(got, reference_grads(x, y)):
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-15)
    assert pending_after_backward and syncs_after_backward == 0 and state == (False, 1)


def test_misuse_fails_with_a_message():
    comm = world()
    model = mlp()
    with pytest.raises(ValueError, match="sync must be one of 'backward', 'deferred'; got 'later'"):
        DataParallel(model, comm, sync="later")
    with pytest.raises(ValueError, match="shard_optimizer must be 0, 1 or 2, got 3"):
        DataParallel(model, comm, shard_optimizer=3)
    with pytest.raises(ValueError, match="shard_optimizer=1 needs the optimizer"):
        DataParallel(model, comm, shard_optimizer=1)
    sync = "deferred" if comm.rank == 1 else "backward"
    with pytest.raises(ModelMismatchError, match=r"rank 1 vs rank 0: 'sync' value 'deferred' \(rank 0: 'backward'\)"):
        DataParallel(model, comm, sync=sync)
    dp = DataParallel(model, comm, sync="deferred")
    x, y = data(comm)
    loss_of(dp, *mine(comm, x, y)).backward()
    try:
        with pytest.raises(RuntimeError, match="no_sync\\(\\) entered while gradients of an earlier backward"):
            with dp.no_sync():
                pass
    finally:
        dp.synchronize()
        dp.close()


def test_close_removes_the_optimizer_hooks():
    """After close() the optimizer no longer asks the reducer: zero_grad and step run even while its last
    reductions are still pending (which the test then completes)."""
    comm = world()
    model = mlp()
    opt = dt.optim.SGD(model.parameters(), lr=0.1)
    dp = DataParallel(model, comm, optimizer=opt, sync="deferred")
    x, y = data(comm)
    loss_of(dp, *mine(comm, x, y)).backward()
    dp.close()
    pending = dp.pending()
    errors = []
    for call in (opt.zero_grad, opt.step):
        try:
            call()
        except RuntimeError as exc:
            errors.append(str(exc))
    dp.synchronize()
    assert pending and errors == []


def test_synchronize_after_no_sync_passes_averages_them():
    """Gradients accumulated inside no_sync() and synchronised by an explicit synchronize() (no backward after
    the block): that call is not the no-op it is right after a synchronised backward."""
    comm = world()
    x, y = data(comm)
    model = mlp()
    dp = DataParallel(model, comm, bucket_mb=1e-4)
    try:
        loss_of(dp, *mine(comm, x, y)).backward()
        for p in model.parameters():
            p.grad = None
        with dp.no_sync():
            loss_of(dp, *mine(comm, x, y)).backward()
        dp.synchronize()
        got = [p.grad.data.copy() for p in model.parameters()]
        syncs = dp.reducer.syncs
    finally:
        dp.close()
    for g, want in zip(got, reference_grads(x, y)):
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-15)
    assert syncs == 2


class _Counter(nn.Module):
    """A Linear whose buffer sums what it saw in training forwards."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("seen", dt.zeros(3))

    def forward(self, x):
        if self.training:
            self.seen.data[...] += x.data.sum(axis=0)
        return self.fc(x)


@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_a_training_forward_starts_from_rank_0s_buffers(broadcast_buffers):
    comm = world()
    dt.manual_seed(0)
    dp = DataParallel(_Counter(), comm, broadcast_buffers=broadcast_buffers)
    try:
        for step in range(2):
            dp(dt.ones(2, 3) * (comm.rank + 1 + step)).sum().backward()
        seen = comm.allgather_object(dp.module.seen.numpy().tolist())
    finally:
        dp.close()
    # step 0 adds 2 (rank + 1) on every rank's copy; step 1 starts from rank 0's 2 (or its own) and adds 2 (rank + 2)
    want = [[2 + 2 * (r + 2)] * 3 if broadcast_buffers else [2 * (r + 1) + 2 * (r + 2)] * 3 for r in range(comm.size)]
    assert seen == want
