"""Pipeline partitioning: the profile's records, the exact balancer, split points, Partition as plain data."""
import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import disttrain as dt
from disttrain import nn
from disttrain.autograd import observe
from disttrain.nn import init
from disttrain.autograd.function import Function
from disttrain.autograd.observe import observe_ops
from disttrain.autograd.ops import cross_entropy
from disttrain.models.lstm_lm import LSTMLanguageModel
from disttrain.parallel.pipeline.blocks import Stage, blocks_of
from disttrain.parallel.pipeline.partition import CutError, Partition, balance, cut_constraints, partition
from disttrain.parallel.pipeline.profile import profile
from user_models import Pair, Sum


# ---- the balancer against brute force --------------------------------------------------------------
def brute_force(costs, stages, cut_bytes, bandwidth):
    """(largest, smallest, bytes) of the best cut by the balancer's order, trying every choice of cuts."""
    n = len(costs)

    def stage(i, j):
        moved = (cut_bytes[i - 1] if i else 0) + (cut_bytes[j - 1] if j < n else 0)
        return sum(costs[i:j]) + moved / bandwidth

    options = []
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0,) + cuts + (n,)
        stage_costs = [stage(i, j) for i, j in zip(bounds, bounds[1:])]
        options.append((max(stage_costs), min(stage_costs), sum(cut_bytes[c - 1] for c in cuts)))
    top = min(o[0] for o in options)
    options = [o for o in options if o[0] <= top * (1 + 1e-9)]
    floor = max(o[1] for o in options)
    options = [o for o in options if o[1] >= floor * (1 - 1e-9)]
    return top, floor, min(o[2] for o in options)


@st.composite
def chains(draw):
    n = draw(st.integers(1, 8))
    # multiples of 1/4: exact in floating point, so ties are real ties (frequent with small integers)
    costs = [q / 4 for q in draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))]
    cut_bytes = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    return costs, draw(st.integers(1, n)), cut_bytes, draw(st.sampled_from([1.0, 4.0, math.inf]))


@settings(max_examples=300, deadline=None)
@given(chains())
def test_balance_is_optimal_against_brute_force(chain):
    costs, stages, cut_bytes, bandwidth = chain
    bounds = balance(costs, stages, cut_bytes, bandwidth)
    n = len(costs)
    assert len(bounds) == stages + 1 and bounds[0] == 0 and bounds[-1] == n
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    part = Partition(bounds, [str(i) for i in range(n)], [0] * n, costs, [0] * n, cut_bytes, bandwidth)
    got = [part.stage_cost(k) for k in range(stages)]
    top, floor, moved = brute_force(costs, stages, cut_bytes, bandwidth)
    assert max(got) == pytest.approx(top, rel=1e-9, abs=1e-12)
    assert min(got) == pytest.approx(floor, rel=1e-9, abs=1e-12)
    assert sum(part.cut_bytes()) == moved


def test_balance_prefers_small_crossing_tensors_and_even_stages():
    # the even compute split (after block 1) sends a large tensor: one block over is cheaper overall
    assert balance([2, 1, 1, 2], 2, cut_bytes=[0, 100, 0, 0], bandwidth=50) == [0, 1, 4]
    # equal stage costs either way: the cut with fewer bytes wins
    assert balance([1, 0, 1], 2, cut_bytes=[5, 3, 0], bandwidth=math.inf) == [0, 2, 3]
    # several cuts reach the best largest stage (4): the one with the most expensive smallest stage wins
    assert balance([4, 1, 1, 1, 1], 3) == [0, 1, 3, 5]
    assert balance([3], 1) == [0, 1]


@pytest.mark.parametrize("args, message", [
    (([1, 2], 3), "cannot cut 2 blocks into 3 stages"),
    (([1, 2], 0), "stages must be a positive int, got 0"),
    (([1, 2], True), "stages must be a positive int, got True"),
    (([1, -2], 2), "finite and >= 0"),
    (([1, math.nan], 2), "finite and >= 0"),
    (([1, 2], 2, [1, 2, 3]), "cut_bytes has 3 entries for 2 blocks"),
    (([1, 2], 2, [1], 0), "bandwidth must be > 0"),
])
def test_balance_errors(args, message):
    with pytest.raises(ValueError, match=message):
        balance(*args)


# ---- split points ---------------------------------------------------------------------------------
def small_lm(layers=3, **kw):
    dt.manual_seed(0)
    return LSTMLanguageModel(50, hidden=16, layers=layers, embed=16, **kw)


def test_split_points_by_name_or_index_override_the_balancer():
    model = small_lm()  # blocks: embedding, lstm.l0, lstm.l1, lstm.l2, decoder
    part = partition(model, None, 3, split_points=["lstm.l1", 4])
    assert part.bounds == [0, 2, 4, 5] and part.chosen_by == "split_points"
    assert part.stage_blocks(1) == ["lstm.l1", "lstm.l2"] and list(part.stage_range(2)) == [4]
    assert part.block_costs is None and part.stage_cost(0) is None and part.imbalance() is None
    assert part.stage_param_bytes(2) == sum(p.data.nbytes for p in model.decoder.parameters())
    assert "chosen by split_points" in part.describe()
    dt.manual_seed(1)
    profiled = partition(model, dt.randint(0, 50, (4, 2)), 2, split_points=["decoder"], repeats=1)
    assert profiled.bounds == [0, 4, 5] and all(c > 0 for c in profiled.block_costs)


@pytest.mark.parametrize("points, stages, error, message", [
    (["lstm.l1"], 3, ValueError, "3 stages need 2 split points, got 1"),
    ([5], 2, ValueError, r"block index 5 out of range; a stage may start at blocks 1..4"),
    ([0], 2, ValueError, "block index 0 out of range"),
    (["embedding"], 2, ValueError, "'embedding' is block 0, where stage 0 starts"),
    (["lstm.l2", "lstm.l1"], 3, ValueError, r"strictly increasing .* \(block indices \[3, 2\]\)"),
    ([2, 2], 3, ValueError, "strictly increasing"),
    (["lstm.l9"], 2, ValueError, "no block named 'lstm.l9'; the blocks are"),
    ([1.5], 2, TypeError, "expected block names or indices, got 1.5"),
    ([1, 2, 3, 4, 4], 6, ValueError, "cannot cut 5 blocks into 6 stages"),
])
def test_split_point_errors(points, stages, error, message):
    with pytest.raises(error, match=message):
        partition(small_lm(), None, stages, split_points=points)


def test_partition_needs_a_sample_or_split_points_and_keeps_tied_weights_together():
    with pytest.raises(ValueError, match="a sample_input"):
        partition(small_lm(), None, 2)
    tied = small_lm(2, tie_weights=True)
    with pytest.raises(ValueError, match="'embedding.weight' of block 'embedding' .* 'decoder.weight' of block "
                                         "'decoder' .* tied weights must stay in one stage"):
        partition(tied, None, 2, split_points=["lstm.l1"])
    assert partition(tied, None, 1).bounds == [0, 4]


# ---- Partition as plain data, and the stages it builds ------------------------------------------
def test_partition_round_trips_through_json_and_builds_stages():
    model = small_lm()
    dt.manual_seed(1)
    part = partition(model, dt.randint(0, 50, (4, 2)), 2, repeats=1)
    again = Partition.from_dict(json.loads(json.dumps(part.to_dict())))
    assert again == part and again.describe() == part.describe()
    stages = [again.build_stage(model, k) for k in range(2)]
    assert [list(s.block_names) for s in stages] == [again.stage_blocks(0), again.stage_blocks(1)]
    with pytest.raises(ValueError, match="the model's blocks .* are not the partitioned blocks"):
        again.build_stage(small_lm(2), 0)
    with pytest.raises(IndexError, match="stage 2 out of range for a partition of 2 stages"):
        again.stage_range(2)
    with pytest.raises(ValueError, match="format_version 99"):
        Partition.from_dict({**part.to_dict(), "format_version": 99})
    with pytest.raises(ValueError, match=r"bounds \[0, 3, 3, 5\] do not cut 5 blocks"):
        Partition.from_dict({**part.to_dict(), "bounds": [0, 3, 3, 5]})


# ---- the profile ----------------------------------------------------------------------------------
def test_profile_records_are_sane_and_leave_no_trace():
    model = small_lm(2, dropout=0.2)
    dt.manual_seed(3)
    steps, batch = 6, 3
    tokens, target = dt.randint(0, 50, (steps, batch)), dt.randint(0, 50, (steps * batch,))
    model.decoder.bias.grad = dt.ones(50)
    rng_before = dt.get_rng_state()
    prof = profile(model, tokens, repeats=2, loss_fn=lambda y: cross_entropy(y, target))
    assert dt.get_rng_state() == rng_before  # profiling drew no random numbers of the training's
    np.testing.assert_array_equal(model.decoder.bias.grad.numpy(), 1.0)  # nor touched its gradients
    assert model.embedding.weight.grad is None
    assert [b.name for b in prof.blocks] == ["embedding", "lstm.l0", "lstm.l1", "decoder"]
    for b in prof.blocks:
        assert b.forward_s > 0 and b.backward_s > 0 and b.cost_s == b.forward_s + b.backward_s
        assert b.output_bytes == math.prod(b.output_shape) * 4 and b.activation_bytes >= b.output_bytes
    assert [b.output_shape for b in prof.blocks] == [(steps, batch, 16)] * 3 + [(steps * batch, 50)]
    params = dict(model.named_parameters())
    assert prof.blocks[1].param_bytes == sum(params[f"lstm.{w}_l0"].data.nbytes
                                             for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    layers = [r for r in prof.ops if r.op == "LSTMLayer"]        # one fused node per layer
    assert [r.block for r in layers] == ["lstm.l0", "lstm.l1"]
    assert all(r.output_bytes == (steps + 2) * batch * 16 * 4 for r in layers)  # the T outputs, last (h, c)
    assert sum(b.ops for b in prof.blocks) == len(prof.ops) and all(r.forward_s >= 0 for r in prof.ops)
    assert "CrossEntropy" in {r.op for r in prof.ops if r.block == "decoder"}  # the loss counts with its block
    table = prof.table()
    assert "lstm.l1" in table and "total" in table and "LSTMLayer" in table


def test_profiling_leaves_function_apply_and_the_observers_as_they_were():
    original = Function.__dict__["apply"]
    profile(small_lm(), dt.randint(0, 50, (3, 2)), repeats=1)
    seen = []
    with pytest.raises(RuntimeError, match="stop"):
        with observe_ops(lambda call: seen.append(call.op.__name__)):
            dt.ones(2, requires_grad=True).exp()
            raise RuntimeError("stop")
    dt.ones(2).exp()
    assert seen == ["Exp"] and Function.__dict__["apply"] is original and not observe.state.active


def test_profile_rejects_bad_settings():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        profile(small_lm(), dt.randint(0, 50, (2, 2)), repeats=0)
    with pytest.raises(ValueError, match="statistic must be one of"):
        profile(small_lm(), dt.randint(0, 50, (2, 2)), statistic="mean")
    with pytest.raises(ValueError, match="clock must be one of"):
        profile(small_lm(), dt.randint(0, 50, (2, 2)), clock="gpu")


def test_profile_on_the_cpu_clock():
    prof = profile(small_lm(), dt.randint(0, 50, (3, 2)), repeats=2, clock="cpu", statistic="min")
    assert prof.clock == "cpu" and all(b.cost_s > 0 for b in prof.blocks)


# ---- the balance target -------------------------------------------------------------------
def uneven_mlp(heavy=40, light=60, batch=16):
    """An MLP whose blocks (the top-level children) are uneven: `heavy` blocks of 8 Linear+Tanh
    layers of width 128 first, `light` blocks of one layer of width 32 last (~10x cheaper).

    NOTE: every GEMM (16 x 128 x 128) stays under OpenBLAS's threading threshold, so the
    profile is not at the mercy of a second BLAS thread on a busy machine.
    NOTE: the heavy layers start at tanh's critical initialisation (weight variance 1/fan_in, zero
    bias), which keeps the gradient's size through all of them. With the default init it shrinks
    ~0.6x a layer, becomes subnormal around block 25 (arithmetic on subnormals is ~15x slower, so
    those blocks cost ~10 ms instead of ~0.7) and zero below: the profile measured underflow.
    """
    def mlp(fan_in, width, depth, critical=False):
        layers = []
        for i in range(depth):
            linear = nn.Linear(fan_in if i == 0 else width, width)
            if critical:
                bound = math.sqrt(3.0 / linear.weight.shape[1])
                init.uniform_(linear.weight, -bound, bound)
                init.zeros_(linear.bias)
            layers += [linear, nn.Tanh()]
        return nn.Sequential(*layers)

    dt.manual_seed(0)
    blocks = ([mlp(128, 128, 8, critical=True) for _ in range(heavy)]
              + [mlp(128 if i == 0 else 32, 32, 1) for i in range(light)])
    return nn.Sequential(*blocks), dt.randn(batch, 128)


def test_balancer_stages_of_an_uneven_model_are_within_15_percent_in_measured_cost():
    model, x = uneven_mlp()
    # this process's CPU time, min over repeats: other processes on the cores (pytest-xdist runs tests side by
    # side) neither count nor, except through the caches, slow the single-threaded blocks down
    prof = profile(model, x, repeats=5, statistic="min", clock="cpu")
    costs = prof.costs()
    n = len(costs)
    for stages in (2, 4):
        part = partition(model, x, stages, profiled=prof)
        measured = [sum(costs[i] for i in part.stage_range(k)) for k in range(stages)]
        assert max(measured) / min(measured) <= 1.15, part.describe()
        equal_counts = [sum(costs[k * n // stages:(k + 1) * n // stages]) for k in range(stages)]
        assert max(equal_counts) / min(equal_counts) > 2  # the model is uneven: equal block counts are not


# ---- what the balancer never cuts ---------------------------------------------------------------
def test_a_module_at_two_positions_is_a_block_at_each_and_both_stay_in_one_stage():
    dt.manual_seed(0)
    shared, act = nn.Linear(4, 4), nn.Tanh()
    model = nn.Sequential(nn.Linear(4, 4), act, shared, act, shared, nn.Linear(4, 2))
    blocks = blocks_of(model)
    assert [name for name, _ in blocks] == ["0", "1", "2", "3", "4", "5"]
    assert list(Stage(blocks).state_dict()) == list(model.state_dict())     # "4.weight" too, as torch's has
    x = dt.randn(3, 4)
    np.testing.assert_array_equal(Stage(blocks)(x)[0].numpy(), model(x).numpy())
    assert sorted(cut_constraints(blocks)) == [3, 4]                        # the tanh is free to go anywhere
    with pytest.raises(CutError, match=r"a stage cannot start at block '4': parameter '2.weight' of block '2' is "
                                       r"'4.weight' of block '4' too; tied weights must stay in one stage"):
        partition(model, None, 2, split_points=["4"])
    for stages in (2, 3, 4):
        part = partition(model, x, stages, repeats=1)
        assert not {3, 4} & set(part.bounds), part.bounds
        assert sum(part.stage_param_count(k) for k in range(stages)) == sum(p.numel() for p in model.parameters())
    with pytest.raises(CutError, match=r"no cut into 5 stages .* choose at most 4 stages"):
        partition(model, x, 5, repeats=1)


def test_balance_starts_no_stage_where_it_may_not():
    assert balance([1, 1, 1, 1], 2) == [0, 2, 4]
    assert balance([1, 1, 1, 1], 2, no_cut_before={2}) in ([0, 1, 4], [0, 3, 4])
    with pytest.raises(CutError, match="not at blocks \\[1, 2, 3\\]"):
        balance([1, 1, 1, 1], 2, no_cut_before={1, 2, 3})


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(6, 3)

    def forward(self, h):
        return self.out(h), h


def test_blocks_returning_tuples_are_profiled_and_no_stage_starts_after_one():
    dt.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Pair(), Sum(), nn.Linear(6, 6), Head())
    x = dt.randn(5, 4)
    loss = lambda output: (output[0] ** 2).mean() + (output[1] ** 2).mean()  # noqa: E731
    prof = profile(model, x, repeats=2, loss_fn=loss)
    assert [b.one_tensor for b in prof.blocks] == [True, True, False, True, True, False]
    assert prof.blocks[2].output_shape == ((5, 6), (5, 6)) and prof.blocks[2].output_bytes == 2 * 5 * 6 * 4
    assert prof.blocks[5].output_shape == ((5, 3), (5, 6)) and all(b.backward_s > 0 for b in prof.blocks[:2])
    assert "((5, 6), (5, 6))" in prof.table()
    for stages in (2, 3, 4, 5):
        assert 3 not in partition(model, x, stages, repeats=1, loss_fn=loss).bounds
    with pytest.raises(CutError, match="not at block '3': block '2' returns more than one Tensor; stages exchange "
                                       "one Tensor; choose at most 5 stages"):
        partition(model, x, 6, repeats=1, loss_fn=loss)
