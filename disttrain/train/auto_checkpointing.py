"""[memory] activation_checkpointing = "auto": fit a job's training step to [memory] budget_mb before training.

    choice = plan_checkpointing(spec, model, data, share)     # the plan is set on the model; None unless "auto"

One step on this process's first training batch runs with every item of the model's chain kept, measured item
by item (disttrain.checkpointing.auto.fit_to_budget); the planner's cheapest plan under the budget is set as
the model's checkpoint_segments. The budget is what the Trainer's MemoryMeter checks: the array bytes a step
needs beyond the parameters, optimizer state and carried state it starts with (activations, gradients,
temporaries). The measuring step leaves nothing behind: the gradients, the random number generator and the
buffers are as they were, so an "auto" run computes what a "none" run computes.
"""
import math

import disttrain as dt
from disttrain.checkpointing.auto import fit_to_budget
from disttrain.checkpointing.planner import NoPlanFits
from disttrain.models import protocol
from disttrain.train.jobspec import JobSpecError

__all__ = ["plan_checkpointing", "smallest_budget_mb"]


def plan_checkpointing(spec, model, data, share):
    """The BudgetChoice set on `model` for the job's budget, or None unless activation_checkpointing = "auto".
    share: this process's share of each training batch. Raises JobSpecError when no plan fits, naming the
    smallest feasible budget_mb."""
    if spec.memory.activation_checkpointing != "auto":
        return None
    budget_mb = spec.memory.budget_mb
    inputs, targets = next(iter(data.train_batches(share)))
    params = list(model.parameters())
    device = params[0].device if params else "cpu"

    def step():
        x, y = dt.tensor(inputs, device=device), dt.tensor(targets, device=device)
        loss, _ = protocol.forward_loss(model, x, y, None)
        loss.backward()

    with _unchanged(model):
        try:
            return fit_to_budget(model, step, int(budget_mb * 2**20), device,
                                 resident=list(model.state_dict(keep_vars=True).values()))
        except NoPlanFits as exc:
            raise JobSpecError(
                f'{spec.source or "<job>"}: [memory] budget_mb = {budget_mb:g}: no activation checkpointing plan '
                f"keeps a training step of this model (batch {tuple(inputs.shape)}) under it; the smallest "
                f"feasible budget is budget_mb = {smallest_budget_mb(exc.smallest):g}") from None


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
