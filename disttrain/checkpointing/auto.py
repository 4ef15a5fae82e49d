"""fit_to_budget: measure one step of a model with every item of its chain kept, choose the plan with the least
recomputation whose peak stays under a budget, and set it as the model's checkpointing.

    choice = fit_to_budget(model, step, budget_bytes)     # step(): one forward + backward of the model
    choice.plan.describe(choice.unit)                     # what is recomputed; choice.peak, choice.extra_seconds

The chain is the one the model's outermost `checkpoint_segments` owner runs (apply_activation_checkpointing):
the blocks of a Transformer LM, the modules of an nn.Sequential, the time steps of an LSTM LM. The probe cuts it
into at most `most_items` measured items (a long recurrence's time steps in groups), each its own kept call; the
planner's plan over those items becomes a plan over the chain's own items (planner.native_plan).
"""
from dataclasses import dataclass

from disttrain.checkpointing.apply import apply_activation_checkpointing, checkpointed_modules
from disttrain.checkpointing.plan import Plan, segment_bounds
from disttrain.checkpointing.planner import (Choice, NoPlanFits, native_plan, plan_for_budget, simulate,
                                             smallest_budget)
from disttrain.checkpointing.probe import ChainProbe
from disttrain.tensor.memory import MemoryMeter

__all__ = ["KeptItems", "BudgetChoice", "fit_to_budget", "MOST_ITEMS"]

MOST_ITEMS = 128        # measured items of one chain: the planner's search grows with their square
CORRECTIONS = 6         # plans measured before the one of the least simulated peak


class KeptItems:
    """A checkpoint_segments policy: a chain of n items as min(n, most) nearly equal pieces, each a kept call
    (nothing recomputed): what the probe measures."""

    def __init__(self, most=MOST_ITEMS):
        self.most = most

    def plan(self, n):
        return Plan.kept(segment_bounds(n, min(n, self.most)), "every item kept")


@dataclass(frozen=True)
class BudgetChoice:
    plan: Plan                  # over the chain's own items, as set on the model
    peak: int                   # predicted peak bytes of a step above its start
    extra_seconds: float        # predicted forward seconds the recomputation adds to a step
    unplanned_peak: int         # predicted peak with nothing recomputed
    unit: str                   # what the chain's items are ("blocks", "time steps", "modules")
    checked_peak: int           # the peak of the step that checked the plan, measured
    held: int = 0               # bytes the budget also covers besides the step (parameters, optimizer state, carried state)

    def describe(self):
        """One line: what is recomputed, the predicted peak, the predicted extra time."""
        beside = (f" beside {self.held / 2**20:.2f} MiB of parameters, optimizer state and carried state"
                  if self.held else "")
        return (f"{self.plan.describe(self.unit)}; predicted step peak {self.peak / 2**20:.2f} MiB{beside} (with "
                f"nothing recomputed {self.unplanned_peak / 2**20:.2f} MiB; checked in one step: "
                f"{self.checked_peak / 2**20:.2f} MiB), predicted extra time {self.extra_seconds * 1e3:.1f} ms a step")


def fit_to_budget(model, step, budget, device="cpu", resident=None, most_items=MOST_ITEMS, held=0):
    """Run step() once with every item of the model's chain kept, under a ChainProbe, and set on the model the
    plan with the least recomputation whose simulated peak is <= budget (bytes above what the step starts
    with) -> BudgetChoice. The plan is checked in one more step (see _checked_choice).

    step(): one forward and backward of the model; each runs with no gradients held (as a training step after
    zero_grad), and the model's gradients are None after (the caller restores what else it changes: the RNG).
    resident: the tensors alive at the start that the step uses (MemoryMeter's); held: for the description,
    what the caller's budget also covers besides the step. Raises planner.NoPlanFits
    (its `smallest`: the least feasible budget), ValueError for a model with no chain.
    """
    owners = checkpointed_modules(model)
    before = [m.checkpoint_segments for m in owners]
    step = _from_no_gradients(model, step)
    apply_activation_checkpointing(model, KeptItems(most_items))
    try:
        with ChainProbe(device, resident=resident) as probe:
            step()
        unit = getattr(owners[0], "checkpoint_unit", "items") if owners else "items"
        costs = probe.costs(unit)
        plan, choice, measured = _checked_choice(model, step, costs, budget, device, resident)
    except BaseException:
        for module, setting in zip(owners, before):
            module.checkpoint_segments = setting
        raise
    unplanned = simulate(costs, Plan.kept([0, costs.n]))[0]
    return BudgetChoice(plan, choice.peak, choice.extra_seconds, unplanned, unit, measured, held)


def _checked_choice(model, step, costs, budget, device, resident):
    """(plan set on the model, planner Choice, measured peak): the planner's choice, measured in one step; where
    the step needs more than the simulation said, planned again for a budget less by the difference (at least
    2% of the budget, doubled at each try), and at last the plan of the least simulated peak. NoPlanFits names
    the least budget this meets: the larger of that plan's simulated and measured peaks."""
    target = budget
    for attempt in range(CORRECTIONS):
        try:
            choice = plan_for_budget(costs, target)
        except NoPlanFits:
            break
        plan = native_plan(costs, choice.plan, "auto")
        measured = _measured(model, step, plan, device, resident)
        if measured <= budget:
            return plan, choice, measured
        target -= max(measured - budget, budget // 50) * 2 ** attempt
    smallest, least = smallest_budget(costs)
    plan = native_plan(costs, least, "auto")
    measured = _measured(model, step, plan, device, resident)
    if max(smallest, measured) <= budget:
        peak, extra = simulate(costs, least)
        return plan, Choice(least, peak, extra, "least"), measured
    raise NoPlanFits(budget, max(smallest, measured), least)


def _from_no_gradients(model, step):
    """step, with every parameter's gradient dropped before and after it."""
    def run():
        _drop_gradients(model)
        step()
        _drop_gradients(model)
    return run


def _drop_gradients(model):
    for p in model.parameters():
        p.grad = None


def _measured(model, step, plan, device, resident):
    """The peak bytes above its start of step() with `plan` set on the model (left set)."""
    apply_activation_checkpointing(model, plan)
    with MemoryMeter(device, resident=resident) as meter:
        step()
    return meter.peak_bytes - meter.start_bytes
