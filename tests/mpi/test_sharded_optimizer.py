"""Sharded optimizer state (DataParallel(shard_optimizer=1 | 2)) equals unsharded data parallelism on 2+ ranks:
float64 to 1e-12, float32 allclose, for SGD (momentum, Nesterov, weight decay) and Adam / AdamW, with global
gradient-norm clipping, an LR schedule, two param groups, and a model whose parameters have sizes no number
of ranks divides, a weight tied between two modules, and a parameter that never gets a gradient. Its full
state_dict equals the unsharded one, and a state saved by a 2-rank sharded run resumes on 1 rank and on the
whole world. Under mpiexec --with-mpi (make test runs 2 and 4 ranks).

Each rank finishes its collectives before it asserts, so a failing rank leaves no other waiting.
"""
import pickle

import numpy as np
import pytest

import disttrain as dt
import disttrain.nn.functional as F
from disttrain import nn
from disttrain.nn.utils import clip_grad_norm_
from disttrain.parallel import DataParallel, world

pytestmark = pytest.mark.mpi(min_size=2)

VOCAB, BATCH, STEPS = 11, 16, 4           # BATCH: the global batch, BATCH / N examples per rank
MAX_NORM = 0.5
TOL = {dt.float64: dict(rtol=1e-12, atol=1e-14), dt.float32: dict(rtol=1e-5, atol=1e-6)}


class Awkward(nn.Module):
    """Embedding (11 x 5) -> Linear 5-7 -> the same Linear 7-7 twice -> Linear 7-5 -> decoder tied to the
    embedding; `unused` never gets a gradient. Sizes 55, 35, 7, 49, 5, 11, 6, 2: most divisible by no N."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 5)
        self.inner = nn.Linear(5, 7)
        self.shared = nn.Linear(7, 7)
        self.unused = nn.Linear(3, 2)
        self.proj = nn.Linear(7, 5)
        self.decoder = nn.Linear(5, VOCAB)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens):
        h = self.inner(self.embed(tokens)).tanh()
        h = self.shared(self.shared(h).tanh()).tanh()
        return self.decoder(self.proj(h))


def awkward(dtype):
    dt.manual_seed(3)
    return Awkward().to(dtype=dtype)


def make_optimizer(kind, model):
    decoder_bias = [model.decoder.bias]
    rest = [p for p in model.parameters() if p is not model.decoder.bias]
    groups = [{"params": rest}, {"params": decoder_bias, "lr": 0.03}]
    if kind == "sgd":
        return dt.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    if kind == "adamw":
        return dt.optim.AdamW(groups, lr=0.02, amsgrad=True)
    return dt.optim.Adam(groups, lr=0.02, weight_decay=0.01)


def batches(count, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, VOCAB, BATCH), rng.integers(0, VOCAB, BATCH)) for _ in range(count)]


def share(array, comm):
    n = BATCH // comm.size
    return array[comm.rank * n:(comm.rank + 1) * n]


def loss_of(model, x, y):
    return F.cross_entropy(model(dt.tensor(x)), dt.tensor(y))


def train(dtype, optim, stage, bucket_mb, comm=None, data=None, accumulate=None, model=None, state=None,
          schedule=True):
    """Data-parallel steps on `data` (default: STEPS batches) over `comm` (default: the world), stage 0 being
    unsharded; returns (parameters, grad norms, full optimizer state, this rank's optimizer-state bytes, dp).
    The loop is the natural one; accumulate="no_sync" runs each step's first half-batch inside no_sync(),
    "synced" as a backward of its own (two averaged gradients summed). `model`, `state`: start from these."""
    comm = comm if comm is not None else world()
    model = model if model is not None else awkward(dtype)
    opt = make_optimizer(optim, model)
    dp = DataParallel(model, comm, bucket_mb=bucket_mb, optimizer=opt, shard_optimizer=stage)
    opt = dp.optimizer
    schedule = dt.optim.StepLR(opt, step_size=2, gamma=0.5) if schedule else None
    if state is not None:
        opt.load_state_dict(state)
    norms = []
    try:
        for x, y in data if data is not None else batches(STEPS):
            x, y = share(x, comm), share(y, comm)
            opt.zero_grad()
            if accumulate is None:
                loss_of(dp, x, y).backward()
            else:
                half = BATCH // comm.size // 2
                with dp.no_sync() if accumulate == "no_sync" else _nothing():
                    (loss_of(dp, x[:half], y[:half]) * 0.5).backward()
                (loss_of(dp, x[half:], y[half:]) * 0.5).backward()
            norms.append(opt.clip_grad_norm_(MAX_NORM) if stage else clip_grad_norm_(model.parameters(), MAX_NORM))
            opt.step()
            if schedule is not None:
                schedule.step()
        full = opt.state_dict()
        nbytes = opt.state_nbytes() if stage else _state_nbytes(opt)
        return [p.data.copy() for p in model.parameters()], norms, full, nbytes, dp
    finally:
        dp.close()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _state_nbytes(opt):
    return sum(v.nbytes for entry in opt.state.values() for v in entry.values() if hasattr(v, "nbytes"))


def assert_states_equal(got, want, tol):
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for index, entry in want["state"].items():
        assert list(got["state"][index]) == list(entry), index
        for key, value in entry.items():
            if hasattr(value, "shape"):
                np.testing.assert_allclose(got["state"][index][key], value, err_msg=f"{index}.{key}", **tol)
            else:
                assert got["state"][index][key] == value, (index, key)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("dtype,optim,bucket_mb,accumulate", [
    (dt.float64, "sgd", 3e-4, None), (dt.float64, "adam", 3e-4, None), (dt.float64, "adam", 1.0, None),
    (dt.float64, "adamw", 1e-4, "no_sync"), (dt.float64, "sgd", 3e-4, "synced"),
    (dt.float32, "adam", 3e-4, None), (dt.float32, "sgd", 1.0, "no_sync")])
def test_sharded_steps_equal_unsharded_data_parallelism(stage, dtype, optim, bucket_mb, accumulate):
    want, want_norms, want_state, want_bytes, plain = train(dtype, optim, 0, bucket_mb, accumulate=accumulate)
    got, norms, state, nbytes, dp = train(dtype, optim, stage, bucket_mb, accumulate=accumulate)
    everyone = world().allgather_object(nbytes)
    tol = TOL[dtype]
    for (name, _), a, b in zip(awkward(dtype).named_parameters(), got, want):
        np.testing.assert_allclose(a, b, err_msg=name, **tol)
    np.testing.assert_allclose(norms, want_norms, **tol)
    assert max(want_norms) > MAX_NORM                          # clipping scaled some steps
    assert_states_equal(state, want_state, tol)
    # each rank keeps its slice only: together exactly the unsharded state, each at most one slice per bucket
    per_element = want_bytes // sum(entry_elements(entry) for entry in want_state["state"].values())
    assert sum(everyone) == want_bytes
    assert max(everyone) <= per_element * sum(bucket.shard_numel for bucket in dp.reducer.buckets)


def entry_elements(entry):
    """Elements of the parameter an optimizer state entry belongs to."""
    return next(value.size for value in entry.values() if hasattr(value, "shape"))


@pytest.mark.parametrize("stage", [1, 2])
def test_a_state_saved_by_a_2_rank_sharded_run_resumes_on_1_rank_and_on_the_world(stage, mpi_tmp_path):
    """Save after 3 steps of a 2-rank sharded run (to a file), load into the world (2 or 4 ranks, sharded), one
    rank (sharded and unsharded); each continues 3 steps. A one-process run of all 6 steps is the reference;
    so is the world resuming from that run's unsharded state."""
    comm = world()
    first, then = batches(3, seed=5), batches(3, seed=6)
    pair, alone = comm.Split(color=comm.rank // 2), comm.Split(color=comm.rank)
    params, _, state, _, _ = train(dt.float64, "adam", stage, 3e-4, comm=pair, data=first, schedule=False)
    path = mpi_tmp_path / "saved.pkl"
    if comm.rank == 0:
        path.write_bytes(pickle.dumps({"model": params, "optimizer": state}))
    comm.Barrier()
    saved = pickle.loads(path.read_bytes())
    reference_first = train(dt.float64, "adam", 0, 3e-4, comm=alone, data=first, schedule=False)
    unsharded = {"model": reference_first[0], "optimizer": reference_first[2]}
    results = {}
    for name, sub, resumed_stage, start in [("world", comm, stage, saved), ("one rank", alone, stage, saved),
                                            ("one rank, unsharded", alone, 0, saved),
                                            ("world, from an unsharded state", comm, stage, unsharded)]:
        results[name] = train(dt.float64, "adam", resumed_stage, 3e-4, comm=sub, data=then,
                              model=loaded_model(start["model"]), state=start["optimizer"], schedule=False)[0]
    want = train(dt.float64, "adam", 0, 3e-4, comm=alone, data=first + then, schedule=False)[0]
    names = [n for n, _ in awkward(dt.float64).named_parameters()]
    for name, got in results.items():
        for pname, a, b in zip(names, got, want):
            np.testing.assert_allclose(a, b, err_msg=f"{name}: {pname}", **TOL[dt.float64])


def loaded_model(arrays):
    model = awkward(dt.float64)
    with dt.no_grad():
        for p, value in zip(model.parameters(), arrays):
            p.copy_(value)
    return model


@pytest.mark.parametrize("stage", [1, 2])
def test_deferred_sync_with_sharded_state_refuses_until_synchronize(stage):
    comm = world()
    data = batches(2, seed=8)
    want = train(dt.float64, "adam", 0, 3e-4, data=data, schedule=False)[0]
    model = awkward(dt.float64)
    dp = DataParallel(model, comm, bucket_mb=3e-4, optimizer=make_optimizer("adam", model), sync="deferred",
                      shard_optimizer=stage)
    opt, errors = dp.optimizer, []
    try:
        for x, y in data:
            opt.zero_grad()
            loss_of(dp, share(x, comm), share(y, comm)).backward()
            for misuse in (opt.zero_grad, opt.step, lambda: opt.clip_grad_norm_(MAX_NORM)):
                try:
                    misuse()
                except RuntimeError as exc:
                    errors.append(str(exc).split(" called while")[0])
            dp.synchronize()
            opt.clip_grad_norm_(MAX_NORM)
            opt.step()
    finally:
        dp.close()
    for a, b in zip([p.data for p in model.parameters()], want):
        np.testing.assert_allclose(a, b, **TOL[dt.float64])
    assert errors == ["zero_grad()", "step()", "clip_grad_norm_()"] * 2


class SideOnRankZero(nn.Module):
    """`side` gets a gradient only from rank 0's examples: every rank must still update it alike."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 7)
        self.side = nn.Linear(7, 3)
        self.head = nn.Linear(7, 3)

    def forward(self, x, use_side):
        h = self.body(x).tanh()
        return self.head(h) + self.side(h) if use_side else self.head(h)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_parameter_with_a_gradient_on_some_ranks_only(stage):
    comm = world()
    rng = np.random.default_rng(4)
    data = [(rng.standard_normal((BATCH, 5)), rng.integers(0, 3, BATCH)) for _ in range(3)]
    dt.manual_seed(2)
    model = SideOnRankZero().double()
    dp = DataParallel(model, comm, bucket_mb=1e-4, optimizer=dt.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                                                          weight_decay=0.1), shard_optimizer=stage)
    try:
        for x, y in data:
            dp.optimizer.zero_grad()
            F.cross_entropy(dp(dt.tensor(share(x, comm)), comm.rank == 0), dt.tensor(share(y, comm))).backward()
            full = [p.grad is not None for p in model.parameters()]
            dp.optimizer.step()
        got = [p.data.copy() for p in model.parameters()]
        held = [None if stage < 2 else b.shard_grad.size for b in dp.reducer.buckets]
        in_sync = dp.in_sync()
    finally:
        dp.close()
    dt.manual_seed(2)
    ref = SideOnRankZero().double()
    opt = dt.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    n = BATCH // comm.size
    for x, y in data:
        opt.zero_grad()
        losses = [F.cross_entropy(ref(dt.tensor(x[r * n:(r + 1) * n]), r == 0), dt.tensor(y[r * n:(r + 1) * n]))
                  for r in range(comm.size)]
        (sum(losses[1:], losses[0]) / comm.size).backward()
        opt.step()
    for (name, p), a in zip(ref.named_parameters(), got):
        np.testing.assert_allclose(a, p.data, err_msg=name, **TOL[dt.float64])
    assert in_sync
    # stage 2: no rank holds a whole gradient after backward, only its slice of each bucket
    assert all(full) if stage < 2 else not any(full) and held == [b.shard_numel for b in dp.reducer.buckets]


@pytest.mark.parametrize("stage", [1, 2])
def test_a_frozen_parameter_in_the_optimizer_is_left_alone_as_unsharded(stage):
    """Fine-tuning passes the whole model's parameters with some frozen (requires_grad False): they never get
    a gradient or a step, sharded or not."""
    def frozen_model():
        model = awkward(dt.float64)
        model.inner.weight.requires_grad_(False)
        return model

    want, _, want_state, _, _ = train(dt.float64, "adam", 0, 3e-4, model=frozen_model())
    got, _, state, _, _ = train(dt.float64, "adam", stage, 3e-4, model=frozen_model())
    for (name, _), a, b in zip(awkward(dt.float64).named_parameters(), got, want):
        np.testing.assert_allclose(a, b, err_msg=name, **TOL[dt.float64])
    np.testing.assert_array_equal(got[1], frozen_model().inner.weight.numpy())
    assert_states_equal(state, want_state, TOL[dt.float64])
