"""The budget planner: the plan with the least recomputation whose step peak stays under a memory budget.

    costs = StepCosts(items=[ItemCost(...), ...], ...)      # measured by disttrain.checkpointing.probe
    peak, extra = simulate(costs, plan)                      # what a plan would need and cost
    choice = plan_for_budget(costs, budget_bytes)            # Choice(plan, peak, extra_seconds), or NoPlanFits

The cost model is the timeline of one training step, measured item by item on a chain (the blocks of a
Transformer or a Sequential, time segments of a recurrent model), with the parts before and after the chain
as constants. All figures are array bytes above what was live when the step began:

    before the chain       before_peak (its peak), before_keep (live when the chain starts)
    item i, forward        forward_peak (peak above the live bytes before it), keep (left alive: its graph and
                           output), out (the carry it hands on), seconds
    after the chain        after_peak (the loss and its backward, above the live bytes at the chain's end),
                           after_change (live when the chain's backward starts, minus at the chain's end)
    item i, backward       backward_peak (peak above the live bytes before it), backward_change (what it frees:
                           its keep; what it adds: its input's gradient, parameter gradients)
    after its backward     tail_peak (the rest of the backward and the clipping, above the live bytes then)

A plan replays this timeline (`simulate`): a kept segment as measured; a recomputed segment's first run keeps
only its output carry (transient: each item's forward_peak), and its backward drops that output, reruns the
segment's pieces (nested plans recurse) and runs their backwards as measured, while the checkpoint holds the
gradients of the segment's parameters (`StepCosts.grads`) apart from .grad until it returns them: adding them
to .grad at the end may take one more copy for a moment. Checkpoints nested in it add their parameters'
gradients into those same sums in place: a nested plan holds them once, whatever its depth. A segment runs as one call over its items, as "sqrt" runs them: a recomputed one then holds fewer
parameter gradients than a rerun item by item, and a long kept run pays no per-call time; a call's transients
may exceed its items' (one loss over all its steps), which fit_to_budget checks by measuring the plan.

`plan_for_budget` searches two families and returns the cheapest plan that fits:
- one level of segments, each kept or recomputed (Chen et al. 2016's segments; the linear-chain case of
  Checkmate): exact dynamic programming over the segment boundaries with Pareto sets of (live bytes at the
  boundary, recomputation seconds), because every peak of a segment is the live bytes at its start plus a
  term of the segment alone. The last segment is kept (its recomputation would start at once);
- binomial nested plans (disttrain.checkpointing.plan.binomial_plan, revolve): O(log n) carries held, every
  item rerun up to r times; for long recurrences whose budget no one-level plan meets.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from disttrain.checkpointing.plan import Plan, Segment, binomial_plan, binomial_reach

__all__ = ["ItemCost", "StepCosts", "Choice", "NoPlanFits", "simulate", "plan_for_budget", "smallest_budget",
           "best_one_level", "native_plan"]

_SLACK = 1e-12            # relative: two recomputation times this close count as equal
MAX_REPETITIONS = 16      # binomial plans rerun an item at most this often: nesting (recursion) stays shallow
SNAPSHOT_STEP = 1.25      # binomial candidates: snapshot counts between the fewest of two repetition counts


@dataclass(frozen=True)
class ItemCost:
    keep: int
    forward_peak: int
    backward_peak: int
    backward_change: int
    out: int
    seconds: float
    grads: int = 0              # gradients of parameters this item alone uses (a block's own weights)


@dataclass(frozen=True)
class StepCosts:
    items: tuple
    before_peak: int = 0
    before_keep: int = 0
    after_peak: int = 0
    after_change: int = 0
    tail_peak: int = 0
    bounds: tuple = ()          # the chain's own item numbers where the measured items start, and its length
    unit: str = "items"         # what the chain's own items are ("blocks", "time steps")
    shared_grads: int = 0       # gradients of parameters every item uses (a recurrence's weights)

    def grads(self, start, stop):
        """Parameter-gradient bytes a recomputed segment [start, stop)'s backward holds until it returns."""
        return self.shared_grads + sum(self.items[i].grads for i in range(start, stop))

    @property
    def n(self):
        return len(self.items)

    def activation_bytes(self):
        """What the step's forward leaves alive for backward with nothing recomputed (loss included)."""
        return self.before_keep + sum(i.keep for i in self.items) + max(0, self.after_change)


@dataclass(frozen=True)
class Choice:
    plan: Plan                  # over the measured items (native_plan maps it to the chain's own items)
    peak: int
    extra_seconds: float
    searched: str = field(default="", compare=False)


class NoPlanFits(ValueError):
    """No plan keeps the step under the budget; `smallest` is the least budget (bytes) some plan meets."""

    def __init__(self, budget, smallest, plan):
        super().__init__(f"no activation checkpointing plan keeps a step under {budget:,} bytes; the smallest "
                         f"feasible budget is {smallest:,} bytes ({plan.label})")
        self.budget, self.smallest, self.plan = budget, smallest, plan


# ---- the timeline of a plan ------------------------------------------------------------------------------------
def simulate(costs, plan):
    """(peak bytes above the step's start, extra forward seconds) of a step that follows `plan` (over the
    measured items)."""
    sim = _Timeline(costs)
    sim.bump(costs.before_peak)
    sim.live = costs.before_keep
    sim.forward(plan.segments)
    sim.bump(sim.live + costs.after_peak)
    sim.live += costs.after_change
    sim.backward(plan.segments)
    sim.bump(sim.live + costs.tail_peak)
    return sim.peak, extra_seconds(costs, plan.segments)


class _Timeline:
    def __init__(self, costs):
        self.costs, self.items, self.live, self.peak = costs, costs.items, 0, 0

    def bump(self, value):
        self.peak = max(self.peak, value)

    def forward(self, segments):
        for s in segments:
            if s.recompute:             # the first run, under no_grad: nothing kept but the output carry
                for i in range(s.start, s.stop):
                    held = self.items[i - 1].out if i > s.start else 0
                    self.bump(self.live + held + self.items[i].forward_peak)
                self.live += self.items[s.stop - 1].out
            else:
                for i in range(s.start, s.stop):
                    self.bump(self.live + self.items[i].forward_peak)
                    self.live += self.items[i].keep

    def backward(self, segments, nested=False):
        """nested: the segments of a recomputation, whose parameter gradients go into the outermost recomputed
        segment's sums (disttrain.checkpointing.checkpoint): held once, by the outermost, whatever the depth; a nested
        one holds two carries instead."""
        for s in reversed(segments):
            if s.recompute:
                self.live -= self.items[s.stop - 1].out
                before = self.live
                self.forward(s.pieces)
                # nested: the rerun's output carry (a root of its pass) and the gradient it is given stay alive
                # until the pass ends, at every level
                held = 2 * self.items[s.stop - 1].out if nested else self.costs.grads(s.start, s.stop)
                self.live += held
                self.backward(s.pieces, nested=True)
                self.bump(self.live + held)
                self.live -= held
                if s.inner or nested:
                    self.live = min(self.live, before + self._left_by_rerun(s))
            else:
                for i in reversed(range(s.start, s.stop)):
                    self.bump(self.live + self.items[i].backward_peak)
                    self.live += self.items[i].backward_change

    def _left_by_rerun(self, s):
        """What a nested plan's recomputed segment leaves alive after its backward: its input carry's gradient and
        its own parameters' gradients. The rest its items' backward leaves (a kept item's output holds its loss
        node to the step's end) goes with the rerun's graph."""
        return self.items[s.start].out + sum(self.items[i].grads for i in range(s.start, s.stop))


def extra_seconds(costs, segments):
    """Forward seconds a plan's recomputations add: every recomputed segment once more, nested ones again."""
    total = 0.0
    for s in segments:
        if s.recompute:
            total += sum(costs.items[i].seconds for i in range(s.start, s.stop)) + extra_seconds(costs, s.inner)
    return total


# ---- one level of segments: exact dynamic programming ----------------------------------------------------------
class _Segments:
    """Per-segment terms of the one-level timeline: each peak = live bytes at the segment's start + a term."""

    def __init__(self, costs):
        items = costs.items
        self.n, self.after = len(items), costs.after_change
        self.keep = np.array([i.keep for i in items], dtype=np.int64)
        self.forward_peak = np.array([i.forward_peak for i in items], dtype=np.int64)
        self.backward_peak = np.array([i.backward_peak for i in items], dtype=np.int64)
        self.out = np.array([i.out for i in items], dtype=np.int64)
        self.seconds = np.array([i.seconds for i in items], dtype=np.float64)
        self.shared_grads = costs.shared_grads
        self.grads = np.array([i.grads for i in items], dtype=np.int64)
        net = self.keep + np.array([i.backward_change for i in items], dtype=np.int64)
        self.suffix = np.concatenate([np.cumsum(net[::-1])[::-1], [0]])   # what items i.. leave behind

    def terms(self, start):
        """Arrays over stop = start+1 .. n of the segment [start, stop): (kept: peak term, live bytes added;
        recomputed: peak term (inf for the last segment), live bytes added, seconds)."""
        keep, forward_peak = self.keep[start:], self.forward_peak[start:]
        kept = np.cumsum(keep)
        before = kept - keep                                                # kept bytes before item i
        forward = np.maximum.accumulate(before + forward_peak)
        backward = np.maximum.accumulate(kept + self.after + self.suffix[start + 1:] + self.backward_peak[start:])
        held = np.concatenate([[0], self.out[start:-1]])                    # the previous item's output
        first_run = np.maximum.accumulate(forward_peak + held)
        rerun = self.after + self.suffix[start + 1:] + forward              # after dropping the segment's output
        held = self.shared_grads + np.cumsum(self.grads[start:])     # the checkpoint's parameter gradients, held and
        returned = self.after + self.suffix[start] + 2 * held         # summed into (twice), and added to .grad
        recomputed = np.maximum(np.maximum(first_run, rerun), np.maximum(backward + held, returned)).astype(np.float64)
        recomputed[-1] = np.inf                                             # the last segment stays kept
        return np.maximum(forward, backward), kept, recomputed, self.out[start:], np.cumsum(self.seconds[start:])


def best_one_level(costs, budget, fastest=True):
    """The one-level plan with the least recomputation whose peak is at most `budget` (None when there is
    none) -> Choice. fastest=False: any plan that fits (the one keeping the least live bytes at each boundary;
    a quicker search, for feasibility).

    fronts[p]: the (live bytes, seconds) pairs of plans of items [0, p) that no other beats in both, each with
    the boundary and front entry it came from; vectorised over a front's entries.
    """
    if costs.before_peak > budget:
        return None
    if not fastest:
        return _fitting(costs, budget)
    table = _Segments(costs)
    arrivals = [[] for _ in range(costs.n + 1)]      # per boundary: (live, seconds, from, entry, recompute)
    arrivals[0].append((np.array([costs.before_keep], dtype=np.int64), np.zeros(1), -1, np.zeros(1, np.int64),
                        False))
    fronts = [None] * (costs.n + 1)
    for start in range(costs.n + 1):
        fronts[start] = front = _merge(arrivals[start], fastest)
        arrivals[start] = None
        if start == costs.n or front is None:
            continue
        live, spent = front["live"], front["spent"]
        kept_term, kept_added, rec_term, rec_added, rec_seconds = table.terms(start)
        room = budget - live[0]                       # the front's fewest live bytes: what any entry can reach
        for k in np.nonzero(np.minimum(kept_term, rec_term) <= room)[0]:
            stop = start + 1 + int(k)
            for recompute, term, added, seconds in ((False, kept_term[k], kept_added[k], 0.0),
                                                     (True, rec_term[k], rec_added[k], rec_seconds[k])):
                fit = int(np.searchsorted(live, budget - term, side="right"))   # live is ascending
                if fit:
                    arrivals[stop].append((live[:fit] + int(added), spent[:fit] + seconds, start, np.arange(fit),
                                           recompute))
    final = fronts[costs.n]
    if final is None:
        return None
    ok = np.nonzero(final["live"] + costs.after_peak <= budget)[0]
    if not len(ok):
        return None
    best = ok[np.lexsort((final["live"][ok], final["spent"][ok]))[0]]
    plan = Plan(_segments_of(fronts, costs.n, int(best)), costs.n, "auto: one level")
    peak, extra = simulate(costs, plan)
    return Choice(plan, peak, extra, "one level")


def _fitting(costs, budget):
    """best_one_level(fastest=False): the plan keeping the fewest live bytes at each boundary, if it fits."""
    table, n = _Segments(costs), costs.n
    least = np.full(n + 1, np.inf)
    least[0] = costs.before_keep
    origin, recomputed = np.zeros(n + 1, np.int64), np.zeros(n + 1, bool)
    for start in range(n):
        if not np.isfinite(least[start]):
            continue
        kept_term, kept_added, rec_term, rec_added, _ = table.terms(start)
        room = budget - least[start]
        kept = np.where(kept_term <= room, least[start] + kept_added, np.inf)
        rec = np.where(rec_term <= room, least[start] + rec_added, np.inf)
        arrive = np.minimum(kept, rec)
        better = arrive < least[start + 1:]
        least[start + 1:][better] = arrive[better]
        origin[start + 1:][better] = start
        recomputed[start + 1:][better] = (rec < kept)[better]
    if not least[n] + costs.after_peak <= budget:
        return None
    segments, stop = [], n
    while stop > 0:
        segments.append(Segment(int(origin[stop]), stop, bool(recomputed[stop])))
        stop = int(origin[stop])
    plan = Plan(tuple(reversed(segments)), n, "auto: one level")
    peak, extra = simulate(costs, plan)
    return Choice(plan, peak, extra, "one level")


def _merge(arrivals, fastest):
    """The arrivals at a boundary cut to the entries no other beats in both live bytes and seconds (fastest), or
    to the one with the fewest live bytes; sorted by live bytes. None when nothing arrived."""
    if not arrivals:
        return None
    live = np.concatenate([a[0] for a in arrivals])
    spent = np.concatenate([a[1] for a in arrivals])
    origin = np.concatenate([np.full(len(a[0]), a[2]) for a in arrivals])
    entry = np.concatenate([a[3] for a in arrivals])
    recompute = np.concatenate([np.full(len(a[0]), a[4]) for a in arrivals])
    order = np.lexsort((spent, live))
    if fastest:
        ranked = spent[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], ranked[:-1]]))
        order = order[ranked < best_before - _SLACK * np.abs(np.where(np.isinf(best_before), 0, best_before))]
    else:
        order = order[:1]
    return {"live": live[order], "spent": spent[order], "from": origin[order], "entry": entry[order],
            "recompute": recompute[order]}


def _segments_of(fronts, stop, entry):
    out = []
    while stop > 0:
        front = fronts[stop]
        start, recompute = int(front["from"][entry]), bool(front["recompute"][entry])
        out.append(Segment(start, stop, recompute))
        stop, entry = start, int(front["entry"][entry])
    return tuple(reversed(out))


# ---- the search ---------------------------------------------------------------------------------------------
def _binomial_candidates(costs):
    """Nested binomial plans, each with the fewest repetitions its snapshot count needs, from the fewest
    snapshots that need at most MAX_REPETITIONS to those that need 2 (one repetition is one level of segments,
    which best_one_level searches exactly). Past the fewest snapshots of a repetition count, the counts grow
    geometrically (by SNAPSHOT_STEP): more snapshots with as many repetitions only save some reruns."""
    n = costs.n
    plans, snapshots = [], 1
    while snapshots < n:
        repetitions = next(r for r in range(1, n + 1) if binomial_reach(snapshots, r) >= n)
        if repetitions < 2:
            break
        if repetitions <= MAX_REPETITIONS:
            plans.append(binomial_plan(n, snapshots, repetitions))
        fewest = min(s for s in range(snapshots + 1, n + 1) if binomial_reach(s, repetitions - 1) >= n)
        snapshots = min(max(snapshots + 1, math.ceil(snapshots * SNAPSHOT_STEP)), fewest)
    return plans


def plan_for_budget(costs, budget):
    """The Choice with the least extra forward seconds among the plans whose simulated peak is <= budget
    (bytes): the optimal one-level plan and the binomial nested plans. Raises NoPlanFits."""
    candidates = []
    one_level = best_one_level(costs, budget)
    if one_level is not None:
        candidates.append(one_level)
    for plan in _binomial_candidates(costs):
        peak, extra = simulate(costs, plan)
        if peak <= budget:
            candidates.append(Choice(Plan(plan.segments, plan.n, "auto: " + plan.label), peak, extra, "binomial"))
    if not candidates:
        smallest, plan = smallest_budget(costs)
        raise NoPlanFits(budget, smallest, plan)
    return min(candidates, key=lambda c: (c.extra_seconds * (1 + _SLACK), c.peak))


def smallest_budget(costs):
    """(the least peak any searched plan reaches, that plan)."""
    found = [(simulate(costs, plan)[0], plan) for plan in _binomial_candidates(costs)]
    low, high = 0, simulate(costs, Plan((Segment(0, costs.n),), costs.n, "none"))[0]
    while low < high:                          # the least budget some one-level plan meets
        middle = (low + high) // 2
        if best_one_level(costs, middle, fastest=False) is None:
            low = middle + 1
        else:
            high = middle
    plan = best_one_level(costs, low, fastest=False).plan
    found.append((simulate(costs, plan)[0], plan))
    return min(found, key=lambda f: f[0])


def native_plan(costs, plan, label=None):
    """`plan` over the measured items as a Plan over the chain's own items (costs.bounds): each segment one call,
    nested ones as nested."""
    bounds = costs.bounds or tuple(range(costs.n + 1))
    return Plan(_native(plan.segments, bounds), bounds[-1], label or plan.label)


def _native(segments, bounds):
    out = []
    for s in segments:
        if s.recompute:
            out.append(Segment(bounds[s.start], bounds[s.stop], True, _native(s.inner, bounds) if s.inner else ()))
        else:
            out.append(Segment(bounds[s.start], bounds[s.stop]))
    return tuple(out)
