"""DataParallel on 2+ ranks against one process with the same global batch (run under mpiexec --with-mpi).

Every rank also computes the one-process reference itself (full batch, same seed), so each test compares
within a rank after the collectives are done: an assertion failure cannot leave another rank waiting.

Float64 agreement is to rounding, not bit-for-bit: a rank sums its B/N examples inside each GEMM and the
allreduce adds the N partial sums, where one process sums B examples in one GEMM; the two orders round
differently (~1e-16 relative per step).
"""
import json

import numpy as np
import pytest

import disttrain as dt
import disttrain.nn.functional as F
from disttrain import nn
from disttrain.models import LSTMLanguageModel
from disttrain.parallel import DataParallel, ModelMismatchError, trace, world

pytestmark = pytest.mark.mpi(min_size=2)

VOCAB, STEPS, T, B = 13, 4, 5, 8          # B is the global batch: 8 streams, B / N per rank
TOL = {dt.float64: dict(rtol=1e-12, atol=1e-14), dt.float32: dict(rtol=1e-5, atol=1e-6)}


def lstm_lm(dtype):
    dt.manual_seed(7)
    return LSTMLanguageModel(VOCAB, hidden=8, layers=2, embed=6).to(dtype=dtype)


def batches(seed=0, count=STEPS, batch=B):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, VOCAB, (T, batch)), rng.integers(0, VOCAB, (T, batch))) for _ in range(count)]


def shard(x, comm):
    n = x.shape[1] // comm.size
    return np.ascontiguousarray(x[:, comm.rank * n:(comm.rank + 1) * n])


def step_loss(model, x, y):
    logits, _ = model(dt.tensor(x))
    return F.cross_entropy(logits, dt.tensor(y.reshape(-1)))


def train(model, opt, data, sync=None):
    for x, y in data:
        loss = step_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        if sync is not None:
            sync()
        opt.step()
    return [p.data.copy() for p in model.parameters()]


def train_data_parallel(dtype, data, progress="thread", bucket_mb=0.001, optim="adam", overlap=True,
                        sync="backward"):
    """The natural loop (sync="backward": backward returns with averaged gradients), or with synchronize()
    between backward and step (sync="deferred")."""
    comm = world()
    model = lstm_lm(dtype)
    opt = make_optimizer(optim, model)
    dp = DataParallel(model, comm, bucket_mb=bucket_mb, optimizer=opt, progress=progress, overlap=overlap,
                      sync=sync)
    try:
        shards = [(shard(x, comm), shard(y, comm)) for x, y in data]
        params = train(dp, opt, shards, dp.synchronize if sync == "deferred" else None)
        return params, dp.in_sync(), len(dp.reducer.buckets)
    finally:
        dp.close()


def make_optimizer(kind, model):
    if kind == "adam":
        return dt.optim.Adam(model.parameters(), lr=0.01)
    return dt.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


@pytest.mark.parametrize("dtype,progress,optim,overlap,sync", [
    (dt.float64, "thread", "adam", True, "backward"), (dt.float64, "hooks", "sgd", True, "backward"),
    (dt.float32, "thread", "adam", True, "backward"), (dt.float32, "thread", "sgd", False, "backward"),
    (dt.float64, "thread", "adam", True, "deferred"), (dt.float32, "hooks", "sgd", False, "deferred")])
def test_k_steps_equal_one_process_with_the_global_batch(dtype, progress, optim, overlap, sync):
    data = batches()
    params, in_sync, n_buckets = train_data_parallel(dtype, data, progress, optim=optim, overlap=overlap, sync=sync)
    model = lstm_lm(dtype)
    expected = train(model, make_optimizer(optim, model), data)
    assert in_sync and n_buckets > 3
    for (name, _), got, want in zip(model.named_parameters(), params, expected):
        np.testing.assert_allclose(got, want, err_msg=name, **TOL[dtype])


def test_runs_are_repeatable_bit_for_bit():
    data = batches(seed=1)
    first, _, _ = train_data_parallel(dt.float32, data)
    second, _, _ = train_data_parallel(dt.float32, data)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_overlap_auto_decides_alike_everywhere_and_keeps_the_numbers():
    """overlap="auto" alternates the modes over its trial steps and then keeps one: every rank keeps the
    same, and the parameters equal an overlapped run's bit for bit (the mode never changes the sums)."""
    comm = world()
    data = batches(seed=2, count=12)
    overlapped, _, _ = train_data_parallel(dt.float32, data, overlap=True)
    model = lstm_lm(dt.float32)
    opt = make_optimizer("adam", model)
    dp = DataParallel(model, comm, bucket_mb=0.001, optimizer=opt, overlap="auto")
    try:
        modes = []
        for x, y in data:
            modes.append(dp.reducer.overlap)
            loss = step_loss(dp, shard(x, comm), shard(y, comm))
            opt.zero_grad()
            loss.backward()
            opt.step()
        choice = dp.reducer.choice
        assert modes[:8] == [True, True, True, False, True, False, True, False]
        assert choice.chosen in (True, False) and all(m == choice.chosen for m in modes[9:])
        everyone = comm.allgather_object((choice.chosen, choice.medians))
        assert all(e == everyone[0] for e in everyone)
        assert (dp.reducer._poller is None) == (dp.reducer.progress == "hooks" or not choice.chosen)
    finally:
        dp.close()
    for a, b in zip([p.data for p in model.parameters()], overlapped):
        np.testing.assert_array_equal(a, b)


class Branchy(nn.Module):
    """head on every example; `side` only on rank 0's examples; `unused` never."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.side = nn.Linear(6, 3)
        self.unused = nn.Linear(2, 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x, use_side):
        h = self.body(x).tanh()
        out = self.head(h)
        return out + self.side(h) if use_side else out


def test_parameters_without_gradient():
    comm = world()
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((2, 4)) for _ in range(comm.size)]
    ys = [rng.integers(0, 3, 2) for _ in range(comm.size)]
    dt.manual_seed(0)
    model = Branchy().double()
    dp = DataParallel(model, comm, bucket_mb=1e-4)
    loss = F.cross_entropy(dp(dt.tensor(xs[comm.rank]), comm.rank == 0), dt.tensor(ys[comm.rank]))
    loss.backward()
    got = {n: None if p.grad is None else p.grad.data.copy() for n, p in model.named_parameters()}
    dp.close()

    dt.manual_seed(0)
    ref = Branchy().double()
    total = sum(F.cross_entropy(ref(dt.tensor(x), r == 0), dt.tensor(y)) for r, (x, y) in enumerate(zip(xs, ys)))
    (total / comm.size).backward()
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert got[name] is None, name
        else:
            np.testing.assert_allclose(got[name], p.grad.data, rtol=1e-12, atol=1e-15, err_msg=name)
    assert got["unused.weight"] is None and got["side.weight"] is not None


def accumulation_reference(data):
    """The gradients of one process on the two micro-batches side by side (a batch of 2B)."""
    ref = lstm_lm(dt.float64)
    x = np.concatenate([data[0][0], data[1][0]], axis=1)
    y = np.concatenate([data[0][1], data[1][1]], axis=1)
    step_loss(ref, x, y).backward()
    return ref


def test_no_sync_accumulation_equals_a_larger_batch():
    """The natural loop: the backward after no_sync() returns with the accumulated sum averaged."""
    comm = world()
    data = batches(seed=3, count=2)                  # two micro-batches of B = the global batch 2B
    model = lstm_lm(dt.float64)
    opt = dt.optim.SGD(model.parameters(), lr=0.1)
    dp = DataParallel(model, comm, bucket_mb=0.001, optimizer=opt)
    with dp.no_sync():
        (step_loss(dp, shard(data[0][0], comm), shard(data[0][1], comm)) * 0.5).backward()
    after_no_sync = dp.reducer.syncs
    (step_loss(dp, shard(data[1][0], comm), shard(data[1][1], comm)) * 0.5).backward()
    got = [p.grad.data.copy() for p in model.parameters()]
    syncs, pending = dp.reducer.syncs, dp.pending()
    dp.close()

    ref = accumulation_reference(data)
    for (name, p), g in zip(ref.named_parameters(), got):
        np.testing.assert_allclose(g, p.grad.data, rtol=1e-12, atol=1e-15, err_msg=name)
    assert after_no_sync == 0 and syncs == 1 and not pending


def test_deferred_sync_accumulates_and_refuses_until_synchronize():
    """sync="deferred": backward returns with the reductions in flight; zero_grad, step and forward are refused
    until synchronize(), and a second backward before it is an error."""
    comm = world()
    data = batches(seed=3, count=2)
    model = lstm_lm(dt.float64)
    opt = dt.optim.SGD(model.parameters(), lr=0.1)
    dp = DataParallel(model, comm, bucket_mb=0.001, optimizer=opt, sync="deferred")
    errors = []
    with dp.no_sync():
        (step_loss(dp, shard(data[0][0], comm), shard(data[0][1], comm)) * 0.5).backward()
    loss = step_loss(dp, shard(data[1][0], comm), shard(data[1][1], comm)) * 0.5
    loss.backward()
    pending = dp.pending()
    for misuse in (opt.zero_grad, opt.step, lambda: dp(dt.tensor(shard(data[0][0], comm)))):
        try:
            misuse()                                 # refused: the allreduces are in flight
        except RuntimeError as exc:
            errors.append(str(exc))
    dp.synchronize()
    got = [p.grad.data.copy() for p in model.parameters()]
    again = step_loss(dp, shard(data[0][0], comm), shard(data[0][1], comm))
    again.backward()
    try:
        step_loss(model, shard(data[0][0], comm), shard(data[0][1], comm)).backward()
    except RuntimeError as exc:                      # a second backward without synchronize()
        errors.append(str(exc))
    dp.synchronize()
    dp.close()

    ref = accumulation_reference(data)
    for (name, p), g in zip(ref.named_parameters(), got):
        np.testing.assert_allclose(g, p.grad.data, rtol=1e-12, atol=1e-15, err_msg=name)
    assert pending and len(errors) == 4, errors
    assert "zero_grad() called while gradient reductions are still pending" in errors[0]
    assert "step() called while gradient reductions are still pending" in errors[1]
    assert "forward() while the gradients of the last backward are not synchronised" in errors[2]
    assert "became ready twice" in errors[3]


def test_bucket_allreduce_starts_before_backward_ends(mpi_tmp_path):
    comm = world()
    dt.manual_seed(0)
    layers = [nn.Linear(192, 192) for _ in range(8)]
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())])
    dp = DataParallel(model, comm, bucket_mb=192 * 193 * 4 / 2**20)     # one layer per bucket
    x = dt.tensor(np.random.default_rng(comm.rank).standard_normal((256, 192)).astype(np.float32))
    tracer = trace.Tracer(rank=comm.rank)
    tracer.start(comm)
    with trace.tracing(tracer):
        for _ in range(2):
            loss = (dp(x) ** 2).mean()
            with trace.span("backward"):
                loss.backward()
            backward_end = trace.now()
            first_start = dp.reducer.buckets[0].handle.started_at
            starts = [b.handle.started_at for b in dp.reducer.buckets]
    path = tracer.write(mpi_tmp_path / "trace.json", comm)
    comm.Barrier()
    dp.close()
    events = json.loads((mpi_tmp_path / "trace.json").read_text())["traceEvents"]
    assert len(starts) == 8 and starts == sorted(starts)
    assert first_start < backward_end
    assert (path is not None) == (comm.rank == 0)
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == set(range(comm.size))
    assert sum(e["name"].startswith("allreduce bucket") for e in spans) == 2 * 8 * comm.size
    assert {"forward", "backward", "sync gradients"} <= {e["name"] for e in spans}


def test_mismatched_models_fail_on_every_rank():
    comm = world()
    dt.manual_seed(0)
    hidden = 8 if comm.rank != 1 else 9
    model = nn.Sequential(nn.Linear(3, hidden), nn.Linear(hidden, 2))
    with pytest.raises(ModelMismatchError, match=r"rank 1 vs rank 0: '0.weight' shape \(9, 3\) \(rank 0: \(8, 3\)\)"):
        DataParallel(model, comm)


def test_broadcast_from_rank_0():
    comm = world()
    dt.manual_seed(comm.rank)                        # different initial weights on every rank
    model = nn.Linear(4, 3)
    dp = DataParallel(model, comm)
    table = comm.Allgather(np.ascontiguousarray(model.weight.data))
    dp.close()
    dt.manual_seed(0)
    np.testing.assert_array_equal(table, np.stack([nn.Linear(4, 3).weight.data] * comm.size))
