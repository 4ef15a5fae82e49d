"""[memory] activation_checkpointing = "auto": fit a job's training step to [memory] budget_mb before training.

    choice = plan_checkpointing(spec, model, data, share, holding, optimizer)   # set on the model; None unless "auto"

One step on this process's first training batch runs with every item of the model's chain kept, measured item
by item (disttrain.checkpointing.auto.fit_to_budget); the planner's cheapest plan under the budget is set as
the model's checkpoint_segments. budget_mb is the whole process's array memory, as the memory estimate
(memory.json, `disttrain plan`) predicts it: the step gets what the parameters, buffers and optimizer state
(and gradient buckets kept through the step) leave of it. The measuring step leaves nothing behind: the
gradients, the random number generator and the buffers are as they were, so an "auto" run computes what a
"none" run computes.
"""
import math

import disttrain as dt
from disttrain.checkpointing.apply import checkpointed_modules
from disttrain.checkpointing.auto import fit_to_budget
from disttrain.checkpointing.planner import NoPlanFits
from disttrain.models import protocol
from disttrain.train import memory_plan
from disttrain.train.jobspec import JobSpecError
from disttrain.train.mode import make_optimizer

__all__ = ["plan_checkpointing", "held_bytes", "smallest_budget_mb"]


def plan_checkpointing(spec, model, data, share, holding, optimizer):
    """The BudgetChoice set on `model` for the job's budget, or None unless activation_checkpointing = "auto".
    share: this process's share of each batch (a mode's train_share()); holding: what the process holds
    besides the step (a mode's memory_holding(), memory_plan.holding_for); optimizer: an Optimizer or a
    factory, for the state its updates will keep. The step gets
    the budget less the parameters, buffers and optimizer state (and, where the mode keeps them through the
    step, the gradients): what the memory estimate adds to the step's peak. Raises JobSpecError when no plan
    fits, naming the smallest feasible budget_mb."""
    if spec.memory.activation_checkpointing != "auto":
        return None
    if not checkpointed_modules(model):       # checked before the probe step, which would fail on it
        raise JobSpecError(f'{spec.source or "<job>"}: [memory] activation_checkpointing = "auto": '
                           f"{type(model).__name__} has no nn.LSTM, no checkpoint_segments setting and no "
                           'nn.Sequential to checkpoint; set it to "none", or give the model a checkpoint_segments '
                           "setting (disttrain.checkpointing.plan.SegmentsSetting)")
    budget_mb = spec.memory.budget_mb
    held = held_bytes(model, optimizer, holding)
    inputs, targets = next(iter(data.train_batches(share)))
    params = list(model.parameters())
    device = params[0].device if params else "cpu"

    x, y = dt.tensor(inputs, device=device), dt.tensor(targets, device=device)
    where = f'{spec.source or "<job>"}: [memory] budget_mb = {budget_mb:g}'
    with _unchanged(model):
        carried = _carried_state(model, x, y)    # every step after the first starts with one, alive throughout
        held += sum(t.data.nbytes for t in protocol.state_tensors(carried))
        if held >= budget_mb * 2**20:
            raise JobSpecError(f"{where}: the parameters and optimizer state alone take {held / 2**20:.1f} MiB; "
                               f"the smallest feasible budget is more than budget_mb = {smallest_budget_mb(held):g}")

        def step():
            loss, _ = protocol.forward_loss(model, x, y, carried)
            with memory_plan.held_gradients(params, holding):
                loss.backward()

        try:
            return fit_to_budget(model, step, int(budget_mb * 2**20) - held, device,
                                 resident=list(model.state_dict(keep_vars=True).values())
                                 + protocol.state_tensors(carried),
                                 held=held)
        except NoPlanFits as exc:
            raise JobSpecError(
                f"{where}: no activation checkpointing plan keeps a training step of this model (batch "
                f"{tuple(inputs.shape)}) under it, with {held / 2**20:.1f} MiB of parameters, optimizer state and "
                f"carried state held; the smallest feasible budget is budget_mb = {smallest_budget_mb(held + exc.smallest):g}"
            ) from None


def _carried_state(model, x, y):
    """The state a step carries to the next (None for a stateless model), from one forward without a graph."""
    if not protocol.carries_state(model):
        return None
    with dt.no_grad():
        _, state = protocol.forward_loss(model, x, y, None)
    return state


def held_bytes(model, optimizer, holding):
    """What the process holds besides the step, as the memory estimate counts it (memory_plan.predict): the
    gradient buffers kept through the step, or ZeRO stage 2's send rows; the step itself holds the gradients
    as the mode does (memory_plan.held_gradients)."""
    optimizer = make_optimizer(optimizer, model.parameters()) if not hasattr(optimizer, "param_groups") else optimizer
    held = memory_plan.predict(model, optimizer, memory_plan.StepProfile(0, 0, 0), holding)
    buffers = held.gradients if holding.gradient_buffers else memory_plan.gradient_rows_bytes(model, holding)
    return held.parameters + held.optimizer + buffers


def smallest_budget_mb(smallest_bytes):
    """The bytes as MiB rounded up to 0.1: a budget_mb that admits them."""
    return math.ceil(smallest_bytes / 2**20 * 10) / 10


class _unchanged:
    """Within: the model in training mode; after: its gradients, buffers, mode and the RNG as before."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.rng = dt.get_rng_state()
        self.training = self.model.training
        self.grads = [(p, p.grad) for p in self.model.parameters()]
        self.buffers = [(b, b.data.copy()) for b in self.model.buffers()]
        self.model.train()

    def __exit__(self, *exc):
        for p, grad in self.grads:
            p.grad = grad
        for b, data in self.buffers:
            b.data[...] = data
        self.model.train(self.training)
        dt.set_rng_state(self.rng)
        return False
