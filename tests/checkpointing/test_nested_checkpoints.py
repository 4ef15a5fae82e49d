"""Nested checkpoints (binomial plans over time steps): the gradients of the plain step, each parameter's hooks
once per pass, and parameter-gradient memory that does not grow with the nesting depth."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.checkpointing import apply_activation_checkpointing, checkpoint
from disttrain.checkpointing.plan import Plan, Segment, binomial_plan
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
