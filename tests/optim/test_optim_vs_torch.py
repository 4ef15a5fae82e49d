"""Each optimizer against torch.optim: same float64 parameters, same random gradients, 20 steps.

Parameter 1 gets no gradient every third step, so skipping (and Adam's per-parameter step count)
is compared too. Tolerance: 1e-12 relative (torch's CPU kernels may fuse a multiply-add).
"""
import itertools

import numpy as np
import pytest

import disttrain as dt

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

SHAPES = [(4, 3), (5,), (2, 2)]
STEPS = 20


def _initial_values(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in SHAPES]


def _gradients(seed):
    """gradients[step][i]: an array, or None when parameter i has no gradient at that step."""
    rng = np.random.default_rng(seed + 1)
    return [[None if (i == 1 and step % 3 == 2) else rng.standard_normal(shape)
             for i, shape in enumerate(SHAPES)] for step in range(STEPS)]


def _groups(params, group_lrs):
    """Parameters 0 and 1 in the first group, 2 in a second one with its own lr (when given)."""
    if group_lrs is None:
        return params
    return [{"params": params[:2]}, {"params": params[2:], "lr": group_lrs}]


def _run_disttrain(name, kwargs, seed, group_lr):
    params = [dt.tensor(v, dtype="float64", requires_grad=True) for v in _initial_values(seed)]
    opt = getattr(dt.optim, name)(_groups(params, group_lr), **kwargs)
    for grads in _gradients(seed):
        for p, g in zip(params, grads):
            p.grad = None if g is None else dt.tensor(g, dtype="float64")
        opt.step()
    return [p.numpy() for p in params]


def _run_torch(name, kwargs, seed, group_lr):
    params = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in _initial_values(seed)]
    opt = getattr(torch.optim, name)(_groups(params, group_lr), foreach=False, **kwargs)
    for grads in _gradients(seed):
        for p, g in zip(params, grads):
            p.grad = None if g is None else torch.tensor(g, dtype=torch.float64)
        opt.step()
    return [p.detach().numpy() for p in params]


def _sgd_cases():
    for momentum, dampening, nesterov, weight_decay, maximize in itertools.product(
            (0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.01), (False, True)):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        yield dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov,
                   weight_decay=weight_decay, maximize=maximize)


def _adam_cases():
    for amsgrad, weight_decay, maximize in itertools.product((False, True), (0.0, 0.1), (False, True)):
        yield dict(lr=0.01, amsgrad=amsgrad, weight_decay=weight_decay, maximize=maximize)
    yield dict(lr=0.05, betas=(0.5, 0.9), eps=1e-6)
    yield dict(lr=0.05, betas=(0.0, 0.0))  # beta1=0: lerp's weight is 1, its other branch


def _case_id(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items() if k != "lr")


CASES = ([("SGD", kw) for kw in _sgd_cases()] + [("Adam", kw) for kw in _adam_cases()]
         + [("AdamW", kw) for kw in _adam_cases()] + [("AdamW", dict(lr=0.01))])  # AdamW's default decay


@pytest.mark.parametrize("group_lr", [None, 0.03], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}[{_case_id(kw)}]" for n, kw in CASES])
def test_matches_torch(name, kwargs, group_lr):
    ours = _run_disttrain(name, kwargs, seed=7, group_lr=group_lr)
    theirs = _run_torch(name, kwargs, seed=7, group_lr=group_lr)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, err_msg=f"parameter {i}")


def test_float32_parameters_stay_float32_and_match_torch():
    values = _initial_values(3)
    ours = [dt.tensor(v, dtype="float32", requires_grad=True) for v in values]
    theirs = [torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in values]
    opt_a = dt.optim.Adam(ours, lr=0.01, weight_decay=0.1)
    opt_b = torch.optim.Adam(theirs, lr=0.01, weight_decay=0.1, foreach=False)
    for grads in _gradients(3):
        for p, q, g in zip(ours, theirs, grads):
            p.grad = None if g is None else dt.tensor(g, dtype="float32")
            q.grad = None if g is None else torch.tensor(g, dtype=torch.float32)
        opt_a.step()
        opt_b.step()
    for p, q in zip(ours, theirs):
        assert p.dtype == np.float32
        np.testing.assert_allclose(p.numpy(), q.detach().numpy(), rtol=1e-5, atol=1e-6)
