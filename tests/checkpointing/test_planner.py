"""The budget planner on synthetic chains: its dynamic programme finds what brute force over every one-level
plan finds, its binomial plans reach O(log n) memory, and an impossible budget names the smallest feasible one."""
import itertools
import math
import random

import pytest

from disttrain.checkpointing.plan import Plan, Segment, binomial_plan, binomial_reach, plan_for
from disttrain.checkpointing.planner import (ItemCost, NoPlanFits, StepCosts, best_one_level, native_plan,
                                             plan_for_budget, simulate, smallest_budget)


def random_chain(n, seed, uniform=False):
    """A chain whose items look like a network's: forward keeps activations and its output, backward frees
    them and adds parameter gradients; a loss after the chain."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        keep = 100 if uniform else rng.randint(20, 200)
        out = 10 if uniform else rng.randint(2, 30)
        grads = 0 if uniform else rng.randint(0, 40)     # uniform: a recurrence, its parameters shared
        items.append(ItemCost(keep=keep, forward_peak=keep + (10 if uniform else rng.randint(0, 50)),
                              backward_peak=out + grads + (20 if uniform else rng.randint(0, 60)),
                              backward_change=-keep + grads, out=out,
                              seconds=1.0 if uniform else rng.choice([0.5, 1.0, 1.5, 2.0, 3.0]), grads=grads))
    return StepCosts(tuple(items), before_peak=rng.randint(0, 40), before_keep=rng.randint(0, 30),
                     after_peak=rng.randint(10, 80), after_change=rng.randint(0, 20), tail_peak=rng.randint(0, 50),
                     shared_grads=0 if uniform else rng.randint(0, 30))


def every_one_level_plan(n):
    """All cuts of [0, n) into segments, each kept or recomputed, the last one kept."""
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [n]
        pieces = list(zip(bounds, bounds[1:]))
        for kinds in itertools.product([False, True], repeat=len(pieces) - 1):
            yield Plan(tuple(Segment(a, b, r) for (a, b), r in zip(pieces, kinds + (False,))), n)


def brute_force(costs, budget):
    fits = [simulate(costs, plan) for plan in every_one_level_plan(costs.n)]
    fits = [(extra, peak) for peak, extra in fits if peak <= budget]
    return min(fits) if fits else None


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_the_dynamic_programme_is_as_good_as_brute_force(n, seed):
    costs = random_chain(n, seed)
    peaks = sorted({simulate(costs, plan)[0] for plan in every_one_level_plan(n)})
    for budget in [peaks[0] - 1] + peaks[:: max(1, len(peaks) // 8)] + [peaks[-1]]:
        want = brute_force(costs, budget)
        got = best_one_level(costs, budget)
        assert (best_one_level(costs, budget, fastest=False) is None) == (want is None)
        if want is None:
            assert got is None, budget
            continue
        assert got is not None, budget
        assert got.peak <= budget and simulate(costs, got.plan) == (got.peak, got.extra_seconds)
        assert math.isclose(got.extra_seconds, want[0], abs_tol=1e-9), (budget, got, want)


def test_the_search_prefers_no_recomputation_when_everything_fits_and_refuses_the_impossible():
    costs = random_chain(6, 3)
    everything = simulate(costs, plan_for(6, None))[0]
    choice = plan_for_budget(costs, everything)
    assert choice.extra_seconds == 0 and not any(s.recompute for s in choice.plan.segments)
    smallest, plan = smallest_budget(costs)
    assert simulate(costs, plan)[0] == smallest
    assert plan_for_budget(costs, smallest).peak <= smallest
    with pytest.raises(NoPlanFits, match=f"smallest feasible budget is {smallest:,} bytes") as raised:
        plan_for_budget(costs, smallest - 1)
    assert raised.value.smallest == smallest


def test_binomial_plans_reach_their_binomial_length_and_rerun_each_item_at_most_r_times():
    for snapshots, repetitions in [(1, 1), (1, 4), (2, 3), (3, 3), (4, 2)]:
        n = binomial_reach(snapshots, repetitions)
        plan = binomial_plan(n, snapshots, repetitions)
        runs = [0] * n

        def count(segments, level):
            held = 0
            for s in segments:
                if s.recompute:
                    held += 1
                    for i in range(s.start, s.stop):
                        runs[i] += 1                 # the first run of the segment
                    count(s.pieces, level + 1)
                else:
                    for i in range(s.start, s.stop):
                        runs[i] += 1
            assert held <= snapshots

        count(plan.segments, 0)
        assert max(runs) <= 1 + repetitions, (snapshots, repetitions, runs)
        assert all(leaf.stop - leaf.start == 1 for leaf in plan.leaves())
    with pytest.raises(ValueError, match="reach 4 items, not 5"):
        binomial_plan(5, 1, 3)


def test_binomial_plans_hold_logarithmic_memory_on_a_long_uniform_chain():
    """512 uniform items: the least one-level peak grows like sqrt(n) carries + activations, a binomial plan's
    like log(n): the planner goes nested when the budget asks for it."""
    costs = random_chain(512, 0, uniform=True)
    low, high = 0, 10 ** 6
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if best_one_level(costs, middle, fastest=False) is None else (low, middle)
    one_level_least = low
    smallest, plan = smallest_budget(costs)
    assert plan.depth() > 1 and smallest < one_level_least / 3, (smallest, one_level_least)
    choice = plan_for_budget(costs, (smallest + one_level_least) // 2)
    assert choice.searched == "binomial" and choice.peak <= (smallest + one_level_least) // 2
    assert choice.plan.depth() > 1


def test_plans_map_to_the_chains_own_items():
    costs = StepCosts(random_chain(3, 1).items, bounds=(0, 16, 32, 40), unit="time steps")
    plan = Plan((Segment(0, 2, True), Segment(2, 3)), 3)
    native = native_plan(costs, plan, "auto")
    assert native == Plan((Segment(0, 32, True), Segment(32, 40)), 40)       # one rerun call, as "sqrt" runs
    assert native.describe("time steps").startswith("auto: recompute time steps 0-31 (1 segment;")
    assert Plan.from_dict(native.to_dict()) == native
    assert native.for_length(20) == Plan((Segment(0, 16, True), Segment(16, 20)), 20)
    kept = native_plan(costs, Plan((Segment(0, 1, True), Segment(1, 3)), 3))
    assert kept == Plan((Segment(0, 16, True), Segment(16, 40)), 40)
    nested = native_plan(costs, binomial_plan(3, 1, 2))
    assert nested.depth() == 2 and Plan.from_dict(nested.to_dict()) == nested
