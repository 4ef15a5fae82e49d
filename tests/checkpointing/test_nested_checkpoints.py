"""Nested checkpoints (binomial plans over time steps): the gradients of the plain step, each parameter's hooks
once per pass, and parameter-gradient memory that does not grow with the nesting depth."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.checkpointing import apply_activation_checkpointing, checkpoint, memory
from disttrain.checkpointing.auto import KeptItems, fit_to_budget
from disttrain.checkpointing.plan import binomial_plan
from disttrain.checkpointing.planner import NoPlanFits, best_one_level
from disttrain.checkpointing.probe import ChainProbe
from disttrain.models import protocol
from disttrain.models.lstm_lm import LSTMLanguageModel

VOCAB = 20


def lstm_lm(dtype="float64", hidden=6, seed=0):
    dt.manual_seed(seed)
    model = LSTMLanguageModel(VOCAB, hidden=hidden, layers=2, embed=5)
    return model.double() if dtype == "float64" else model


def window(steps, batch=2, seed=0):
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (steps + 1, batch))
    return dt.tensor(tokens[:-1]), dt.tensor(tokens[1:])


def lm_step(model, setting, tokens, targets):
    """(loss, gradients) of one step of `model` with activation checkpointing `setting`; .grad cleared after."""
    apply_activation_checkpointing(model, setting)
    model.zero_grad()
    loss, _ = protocol.forward_loss(model, tokens, targets, None)
    loss.backward()
    grads = [p.grad.numpy().copy() for p in model.parameters()]
    model.zero_grad()
    return loss.item(), grads


@pytest.mark.parametrize("steps, snapshots, depth", [(6, 2, 2), (8, 2, 3), (12, 2, 4), (24, 3, 4), (16, 1, 15)])
def test_nested_plans_give_the_plain_gradients(steps, snapshots, depth):
    model = lstm_lm()
    tokens, targets = window(steps)
    plan = binomial_plan(steps, snapshots)
    assert plan.depth() == depth
    plain_loss, plain = lm_step(model, None, tokens, targets)
    loss, nested = lm_step(model, plan, tokens, targets)
    assert abs(loss - plain_loss) <= 1e-13
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, nested)) <= 1e-13


def test_a_rerun_returning_other_outputs_is_refused():
    x = dt.randn(3, dtype="float64", requires_grad=True)

    def fn(v):  # more outputs in its first run (no_grad) than when rerun: gradients would go to the wrong ones
        return (v * 2, v * 3) if not dt.is_grad_enabled() else (v * 2,)

    a, _ = checkpoint(fn, x)
    with pytest.raises(RuntimeError, match="same structure in both runs"):
        a.sum().backward()


def test_each_parameters_hooks_fire_once_per_pass_with_the_final_gradient():
    model = lstm_lm()
    tokens, targets = window(24)
    _, plain = lm_step(model, None, tokens, targets)
    seen = {}
    for p in model.parameters():
        p.register_hook(lambda g, p=p: seen.setdefault(("pre", id(p)), []).append(1))
        p.register_post_accumulate_grad_hook(lambda t: seen.setdefault(("post", id(t)), []).append(t.grad.numpy().copy()))
    plan = binomial_plan(24, 3)
    assert plan.depth() == 4
    _, nested = lm_step(model, plan, tokens, targets)
    for p, expected in zip(model.parameters(), plain):
        assert len(seen[("pre", id(p))]) == 1
        [at_hook] = seen[("post", id(p))]        # once, and by then the gradient is final
        np.testing.assert_allclose(at_hook, expected, rtol=0, atol=1e-13)


def test_a_leaf_used_inside_nested_checkpoints_without_being_passed_is_accumulated_once():
    dt.manual_seed(0)
    w = dt.randn(4, dtype="float64", requires_grad=True)
    x = dt.randn(3, 4, dtype="float64", requires_grad=True)
    fired = []
    w.register_post_accumulate_grad_hook(lambda t: fired.append(1))

    def inner(u):
        return (u * w).tanh()

    def outer(v):
        return checkpoint(inner, v) * w        # w: a closure in both, known to neither checkpoint

    checkpoint(outer, x).sum().backward()
    nested = w.grad.numpy().copy(), x.grad.numpy().copy()
    assert fired == [1]
    w.grad = x.grad = None
    ((x * w).tanh() * w).sum().backward()
    np.testing.assert_allclose(nested[0], w.grad.numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(nested[1], x.grad.numpy(), rtol=0, atol=1e-14)


def nested_step_peak(model, plan, tokens, targets, resident=None):
    apply_activation_checkpointing(model, plan)
    model.zero_grad()
    resident = resident or list(model.state_dict(keep_vars=True).values()) + [tokens, targets]
    with memory.MemoryMeter(resident=resident) as meter:
        loss, _ = protocol.forward_loss(model, tokens, targets, None)
        loss.backward()
    model.zero_grad()
    return meter.peak_bytes - meter.start_bytes


def test_parameter_gradients_cost_the_same_at_every_nesting_depth():
    """A vocabulary large against the state: the embedding's and the decoder's gradients dwarf a time step's
    activations. Nesting 2 to 6 deep, the step's peak stays within a fifth of one copy of the parameter gradients
    (each level holding its own copy, as nested checkpoints did, costs a copy or more per level)."""
    dt.manual_seed(0)
    model = LSTMLanguageModel(1000, hidden=8, layers=2, embed=8)
    tokens = np.random.default_rng(0).integers(0, 1000, (25, 2))
    tokens, targets = dt.tensor(tokens[:-1]), dt.tensor(tokens[1:])
    grads = sum(p.data.nbytes for p in model.parameters())
    peaks = {}
    for snapshots in (6, 4, 3, 2):
        plan = binomial_plan(24, snapshots)
        peaks[plan.depth()] = nested_step_peak(model, plan, tokens, targets)
    assert sorted(peaks) == [2, 3, 4, 6]
    assert max(peaks.values()) - min(peaks.values()) <= grads / 5, (peaks, grads)
    assert max(peaks.values()) <= 3 * grads, (peaks, grads)


def test_auto_goes_binomial_on_a_long_window_at_a_tight_budget_and_meets_it():
    """bptt 512: at the smallest budget any plan meets, and a little above it, the planner's choice is nested
    (binomial over time steps), below what any one-level plan needs; the measured peak stays under the budget and
    the gradients are the plain step's."""
    dt.manual_seed(0)
    model = LSTMLanguageModel(20, hidden=16, layers=1)
    tokens, targets = window(512, batch=8)
    resident = list(model.state_dict(keep_vars=True).values()) + [tokens, targets]

    def step():
        loss, _ = protocol.forward_loss(model, tokens, targets, None)
        loss.backward()

    _, plain = lm_step(model, None, tokens, targets)
    with pytest.raises(NoPlanFits) as raised:
        fit_to_budget(model, step, 1, resident=resident)
    smallest = raised.value.smallest
    for budget in (smallest, int(smallest * 1.05)):
        choice = fit_to_budget(model, step, budget, resident=resident)
        assert choice.plan.depth() > 1, choice.describe()
        assert best_one_level(probe_costs(model, step, resident), budget) is None   # no one-level plan fits
        model.zero_grad()
        assert nested_step_peak(model, choice.plan, tokens, targets) <= budget
        _, nested = lm_step(model, choice.plan, tokens, targets)
        for g, want in zip(nested, plain):
            np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


def probe_costs(model, step, resident):
    """The StepCosts fit_to_budget plans with: one step with every item of the chain kept, probed."""
    apply_activation_checkpointing(model, KeptItems())
    model.zero_grad()
    with ChainProbe(resident=resident) as probe:
        step()
    model.zero_grad()
    return probe.costs()
