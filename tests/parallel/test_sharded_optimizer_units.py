"""Sharded optimizer state on one rank and its parts: the partition of a bucket into the ranks' slices, the
equality with the wrapped optimizer, state taken over and restored, and the errors (the many-rank cases:
tests/mpi/test_sharded_optimizer.py)."""
import numpy as np
import pytest

import disttrain as dt
import disttrain.nn.functional as F
from disttrain import nn, trace
from disttrain.nn.utils import clip_grad_norm_
from disttrain.parallel import DataParallel, world
from disttrain.parallel.buckets import Bucket, Reducer
from disttrain.parallel.sharded_optimizer import ShardedOptimizer


@pytest.mark.parametrize("sizes,ranks", [([7], 2), ([7, 3, 13], 4), ([1, 1, 1], 5), ([12, 4], 4), ([5], 1)])
def test_the_ranks_slices_tile_the_bucket_and_cut_parameters_only_at_slice_ends(sizes, ranks):
    named = [(f"p{i}", nn.Parameter(np.zeros(n))) for i, n in enumerate(sizes)]
    bucket = Bucket(0, named, ranks)
    S = bucket.shard_numel
    assert S == -(-sum(sizes) // ranks)
    covered = []
    for rank in range(ranks):
        spans = bucket.spans_of(rank)
        position = 0
        for i, lo, hi, pos in spans:
            assert pos == position and 0 <= lo < hi <= sizes[i]   # contiguous within the slice, in order
            covered.append((bucket.offsets[i] + lo, bucket.offsets[i] + hi))
            assert rank * S <= bucket.offsets[i] + lo and bucket.offsets[i] + hi <= (rank + 1) * S
            position += hi - lo
    assert covered == sorted(covered)
    flat = [k for a, b in covered for k in range(a, b)]
    assert flat == list(range(sum(sizes)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.b(self.a(x).tanh())


def net():
    dt.manual_seed(1)
    return Net().double()


OPTIMIZERS = {"sgd": lambda ps: dt.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
              "adam": lambda ps: dt.optim.Adam(ps, lr=0.05, weight_decay=0.1)}


def take_steps(model, opt, stage, batches, forward=None):
    """The natural loop with clipping on `batches`; returns the gradient norms."""
    norms = []
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy((forward or model)(dt.tensor(x)), dt.tensor(y)).backward()
        norms.append(opt.clip_grad_norm_(0.1) if stage else clip_grad_norm_(model.parameters(), 0.1))
        opt.step()
    return norms


def batches(count=3):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((6, 3)), rng.integers(0, 2, 6)) for _ in range(count)]


def run(kind, stage, data):
    model = net()
    opt = OPTIMIZERS[kind](model.parameters())
    dp = DataParallel(model, world(), bucket_mb=1e-4, optimizer=opt, shard_optimizer=stage)
    norms = take_steps(model, dp.optimizer, stage, data, dp)
    dp.close()
    return [p.data.copy() for p in model.parameters()], norms, dp.optimizer.state_dict()


def assert_states_equal(got, want):
    assert got["param_groups"] == want["param_groups"] and got["state"].keys() == want["state"].keys()
    for index, entry in want["state"].items():
        for key, value in entry.items():
            np.testing.assert_allclose(got["state"][index][key], value, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("stage", [1, 2])
def test_one_rank_equals_the_wrapped_optimizer(kind, stage):
    want, want_norms, want_state = run(kind, 0, batches())
    got, norms, state = run(kind, stage, batches())
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-14)
    assert_states_equal(state, want_state)
    assert len(state["state"]) == 4                  # not for `unused`, which never had a gradient


@pytest.mark.parametrize("stage", [1, 2])
def test_wrapping_an_optimizer_that_has_state_continues_from_it(stage):
    """The wrapper takes the wrapped optimizer's state over (sliced); the wrapped one keeps its groups only."""
    data = batches(3)
    want, _, want_state = run("adam", 0, data)
    model = net()
    opt = OPTIMIZERS["adam"](model.parameters())
    take_steps(model, opt, 0, data[:2])
    dp = DataParallel(model, world(), bucket_mb=1e-4, optimizer=opt, shard_optimizer=stage)
    take_steps(model, dp.optimizer, stage, data[2:], dp)
    dp.close()
    for a, b in zip([p.data for p in model.parameters()], want):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-16)
    assert_states_equal(dp.optimizer.state_dict(), want_state)
    assert not opt.state and opt.param_groups is dp.optimizer.param_groups and len(opt.param_groups) == 1


def test_lr_schedules_on_either_object_reach_the_slices():
    """The sharded optimizer's param groups are the wrapped optimizer's: a schedule built on either (before or
    after wrapping) sets the lr the slices are updated with."""
    model = net()
    opt = OPTIMIZERS["sgd"](model.parameters())
    before_wrapping = dt.optim.StepLR(opt, step_size=1, gamma=0.5)
    dp = DataParallel(model, world(), bucket_mb=1e-4, optimizer=opt, shard_optimizer=1)
    after_wrapping = dt.optim.StepLR(dp.optimizer, step_size=1, gamma=0.5)
    before_wrapping.step()
    after_wrapping.step()
    take_steps(model, dp.optimizer, 1, batches(1), dp)
    dp.close()
    reference = net()
    plain = dt.optim.SGD(reference.parameters(), lr=0.025, momentum=0.9, weight_decay=0.1)
    take_steps(reference, plain, 0, batches(1))
    for a, b in zip(model.parameters(), reference.parameters()):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-14, atol=1e-16)
    assert dp.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.025


def test_the_wrapped_optimizer_refuses_to_step():
    model = net()
    opt = OPTIMIZERS["adam"](model.parameters())
    dp = DataParallel(model, world(), optimizer=opt, shard_optimizer=1)
    with pytest.raises(RuntimeError, match="this Adam is wrapped by a ShardedOptimizer, which holds its state"):
        opt.step()
    dp.close()


def test_a_state_that_does_not_fit_changes_nothing():
    _, _, saved = run("adam", 0, batches(1))
    model = net()
    dp = DataParallel(model, world(), optimizer=OPTIMIZERS["adam"](model.parameters()), shard_optimizer=2)
    opt = dp.optimizer
    bad = {"state": {**saved["state"], 0: {**saved["state"][0], "exp_avg": np.zeros((4, 3))}},
           "param_groups": [{**saved["param_groups"][0], "lr": 9.0}]}
    with pytest.raises(ValueError, match=r"loaded state 'exp_avg' of parameter 0 has shape \(4, 3\), the parameter "
                                         r"has shape \(5, 3\)"):
        opt.load_state_dict(bad)
    for index in (17, 6):                                       # 6: one past the last parameter
        unknown = {"state": {index: saved["state"][0]}, "param_groups": saved["param_groups"]}
        with pytest.raises(ValueError, match=f"parameter index {index}, which none of its param groups lists"):
            opt.load_state_dict(unknown)
    fewer = {"state": {}, "param_groups": [{**saved["param_groups"][0], "params": [0, 1]}]}
    with pytest.raises(ValueError, match="loaded state dict has 2 parameters, this optimizer's group has 6"):
        opt.load_state_dict(fewer)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.state_dict()["state"] == {}
    dp.close()


def test_a_loaded_state_sets_the_hyperparameters_of_both_objects_groups():
    _, _, saved = run("adam", 0, batches(1))
    saved["param_groups"][0]["lr"] = 0.5
    model = net()
    opt = OPTIMIZERS["adam"](model.parameters())
    dp = DataParallel(model, world(), optimizer=opt, shard_optimizer=1)
    dp.optimizer.load_state_dict(saved)
    assert dp.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.5
    assert_states_equal(dp.optimizer.state_dict(), saved)
    dp.close()


def test_the_default_stage_is_1_over_an_allreduce_reducer():
    model = net()
    allreduce = Reducer(list(model.named_parameters()), world())
    assert ShardedOptimizer(dt.optim.SGD(model.parameters(), lr=0.1), allreduce).stage == 1
    allreduce.close()


def test_its_repr_names_the_stage_the_slices_and_the_wrapped_optimizer():
    model = net()
    dp = DataParallel(model, world(), optimizer=OPTIMIZERS["sgd"](model.parameters()), shard_optimizer=2)
    text = repr(dp.optimizer)
    assert text.startswith("ShardedOptimizer(stage=2, rank 0 of 1, 6 pieces in 1 buckets) of SGD (")
    assert "lr=0.1, momentum=0.9" in text
    dp.close()


def test_a_traced_step_records_each_buckets_allgather_on_the_comm_lane():
    model = net()
    dp = DataParallel(model, world(), bucket_mb=1e-4, optimizer=OPTIMIZERS["sgd"](model.parameters()),
                      shard_optimizer=1)
    with trace.tracing(trace.Tracer()) as tracer:
        take_steps(model, dp.optimizer, 1, batches(1), dp)
    dp.close()
    gathers = [(name, args["params"]) for name, lane, _, _, args in tracer.spans if name.startswith("allgather")]
    assert gathers == [(f"allgather bucket {b.index}", len(b.params)) for b in dp.reducer.buckets]
    assert all(lane == "comm" for name, lane, *_ in tracer.spans if name.startswith("allgather"))


class Plain(dt.optim.SGD):
    """An optimizer whose constructor does not take its defaults back as keywords."""

    def __init__(self, params):
        super().__init__(params, lr=0.1)


def test_misuse_fails_with_a_message():
    model = net()
    comm = world()
    allreduce = Reducer(list(model.named_parameters()), comm)
    with pytest.raises(ValueError, match="stage must be 1 or 2, got 0"):
        ShardedOptimizer(dt.optim.SGD(model.parameters(), lr=0.1), allreduce, 0)
    with pytest.raises(ValueError, match="stage 2 needs a Reducer with collective='reduce_scatter', got 'allreduce'"):
        ShardedOptimizer(dt.optim.SGD(model.parameters(), lr=0.1), allreduce, 2)
    stranger = dt.tensor(np.zeros(3), requires_grad=True)
    with pytest.raises(ValueError, match=r"the optimizer's parameter 6 \(shape \(3,\)\) is not one the data-parallel "
                                         "model trains"):
        ShardedOptimizer(dt.optim.SGD(list(model.parameters()) + [stranger], lr=0.1), allreduce, 1)
    with pytest.raises(TypeError, match=r"builds a Plain over each rank's slices as Plain\(param_groups, "
                                        r"\*\*optimizer.defaults\), which failed"):
        ShardedOptimizer(Plain(model.parameters()), allreduce, 1)
    allreduce.close()
