"""Pipeline schedules: the ordered forward/backward actions each stage runs for one step of M micro-batches.

    actions = stage_actions("1f1b", stages=4, micro_batches=8, stage=1)
    # [F0, F1, F2, B0, F3, B1, F4, B2, ..., B7]   (Action(kind, micro_batch))

GPipe (Huang et al. 2019): every stage runs all M forwards, then all M backwards; a stage holds the
activations of all M micro-batches at the flush.
1F1B (PipeDream-Flush, Narayanan et al. 2021): stage k of K runs min(K-1-k, M) warm-up forwards, then
alternates one forward and one backward, then drains the remaining backwards; at most K - k <= K
micro-batches are in flight (forwarded, not yet backwarded) on stage k, so its activation memory is bounded
by K instead of M. Both schedules have the same bubble, (K-1)/(M+K-1) of a step with equal stages.

These are pure functions (no MPI): the runtime executes the lists, and `simulate` runs all stages' lists
against each other in unit time steps to check dependencies and measure the bubble.
"""
from collections import namedtuple

__all__ = ["Action", "SCHEDULES", "stage_actions", "max_in_flight", "simulate", "ScheduleDeadlock"]

SCHEDULES = ("gpipe", "1f1b")

Action = namedtuple("Action", "kind micro_batch")        # kind: "F" (forward) or "B" (backward)
Action.__repr__ = lambda self: f"{self.kind}{self.micro_batch}"


class ScheduleDeadlock(RuntimeError):
    """No stage can run its next action: the schedules wait on each other."""


def stage_actions(kind, stages, micro_batches, stage):
    """The ordered actions of `stage` (0-based) of `stages` for one step of `micro_batches` micro-batches."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
    if not (stages >= 1 and micro_batches >= 1 and 0 <= stage < stages):
        raise ValueError(f"need stages >= 1, micro_batches >= 1 and 0 <= stage < stages, got stages={stages}, "
                         f"micro_batches={micro_batches}, stage={stage}")
    forwards = [Action("F", m) for m in range(micro_batches)]
    backwards = [Action("B", m) for m in range(micro_batches)]
    if kind == "gpipe":
        return forwards + backwards
    warmup = min(stages - 1 - stage, micro_batches)
    actions = forwards[:warmup]
    for m in range(warmup, micro_batches):                  # steady state: one forward, one backward
        actions += [forwards[m], backwards[m - warmup]]
    return actions + backwards[micro_batches - warmup:]     # cool-down


def max_in_flight(actions):
    """The most micro-batches forwarded but not yet backwarded at any point of `actions`."""
    live = peak = 0
    for action in actions:
        live += 1 if action.kind == "F" else -1
        peak = max(peak, live)
    return peak


def simulate(kind, stages, micro_batches, forward_cost=1, backward_cost=2):
    """Run every stage's actions against each other with fixed costs (communication is free).

    A forward of micro-batch m on stage k starts once stage k-1 finished it; a backward once stage k+1
    finished its backward (the last stage: once its own forward is done). Returns
    {"timeline": per stage [(action, start, end)], "makespan": float, "bubble": idle fraction}.
    Raises ScheduleDeadlock when the schedules cannot all finish.
    """
    plans = [stage_actions(kind, stages, micro_batches, k) for k in range(stages)]
    done = {}                                  # (stage, action) -> finish time
    clock = [0.0] * stages
    position = [0] * stages
    timeline = [[] for _ in range(stages)]
    while any(position[k] < len(plans[k]) for k in range(stages)):
        progressed = False
        for k in range(stages):
            if position[k] == len(plans[k]):
                continue
            action = plans[k][position[k]]
            ready = _ready_time(action, k, stages, done)
            if ready is None:
                continue
            start = max(clock[k], ready)
            clock[k] = start + (forward_cost if action.kind == "F" else backward_cost)
            done[k, action] = clock[k]
            timeline[k].append((action, start, clock[k]))
            position[k] += 1
            progressed = True
        if not progressed:
            waiting = {k: plans[k][position[k]] for k in range(stages) if position[k] < len(plans[k])}
            raise ScheduleDeadlock(f"{kind} with {stages} stages, {micro_batches} micro-batches: stages wait on "
                                   f"each other at {waiting}")
    makespan = max(clock)
    busy = micro_batches * (forward_cost + backward_cost) * stages
    return {"timeline": timeline, "makespan": makespan, "bubble": 1 - busy / (makespan * stages)}


def _ready_time(action, stage, stages, done):
    """When `action`'s inputs exist on `stage` (None: not yet)."""
    m = action.micro_batch
    if action.kind == "F":
        needs = [(stage - 1, Action("F", m))] if stage > 0 else []
    else:
        needs = [(stage, Action("F", m))]
        if stage < stages - 1:
            needs.append((stage + 1, Action("B", m)))
    times = [done.get(need) for need in needs]
    if any(t is None for t in times):
        return None
    return max(times, default=0.0)
