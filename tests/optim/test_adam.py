"""Adam and AdamW against a scalar reference written from the update rule (no torch needed)."""
import math

import numpy as np
import pytest

import disttrain as dt
from disttrain.tensor import backend, kernels_numpy


def _param(values):
    return dt.tensor(np.array(values), dtype="float64", requires_grad=True)


def _reference(p, grads, lr, betas, eps, weight_decay=0.0, decoupled=False, amsgrad=False):
    """Adam on one scalar, step by step, in the textbook form with bias-corrected moments."""
    (b1, b2), m, v, v_max = betas, 0.0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p *= 1 - lr * weight_decay
        else:
            g += weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v_max = max(v_max, v)
        v_hat = (v_max if amsgrad else v) / (1 - b2 ** t)
        p -= lr * (m / (1 - b1 ** t)) / (math.sqrt(v_hat) + eps)
    return p


def test_first_step_moves_by_lr_times_sign():
    p = _param([1.0, 2.0, -3.0])
    p.grad = dt.tensor(np.array([0.5, -4.0, 1e-3]), dtype="float64")
    opt = dt.optim.Adam([p], lr=0.1, eps=1e-8)
    opt.step()
    # m_hat = g and v_hat = g^2 after one step, so the update is lr * g / (|g| + eps)
    g = np.array([0.5, -4.0, 1e-3])
    np.testing.assert_allclose(p.numpy(), np.array([1.0, 2.0, -3.0]) - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-14)
    assert opt.state[p]["step"] == 1
    np.testing.assert_allclose(opt.state[p]["exp_avg"], 0.1 * g, rtol=1e-14)
    np.testing.assert_allclose(opt.state[p]["exp_avg_sq"], 0.001 * g * g, rtol=1e-12)


@pytest.mark.parametrize("name,decoupled", [("Adam", False), ("AdamW", True)])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_matches_scalar_reference(name, decoupled, amsgrad, weight_decay):
    grads = [1.0, -0.2, 0.05, 3.0, -0.01, 0.0, 0.7]  # shrinking grads make amsgrad's max matter
    p = _param([0.8])
    opt = getattr(dt.optim, name)([p], lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay,
                                  amsgrad=amsgrad)
    for g in grads:
        p.grad = dt.tensor(np.array([g]), dtype="float64")
        opt.step()
    expected = _reference(0.8, grads, 0.02, (0.8, 0.95), 1e-6, weight_decay, decoupled, amsgrad)
    assert p.numpy()[0] == pytest.approx(expected, rel=1e-12)


def test_adamw_default_weight_decay_is_decoupled():
    p = _param([2.0])
    opt = dt.optim.AdamW([p], lr=0.1)
    assert opt.defaults["weight_decay"] == 1e-2
    p.grad = dt.tensor(np.array([0.0]), dtype="float64")
    opt.step()  # zero gradient: only the decay moves the weight
    assert p.numpy()[0] == pytest.approx(2.0 * (1 - 0.1 * 1e-2), rel=1e-15)


def test_maximize_ascends():
    p = _param([1.0])
    p.grad = dt.tensor(np.array([0.3]), dtype="float64")
    dt.optim.Adam([p], lr=0.1, maximize=True).step()
    assert p.numpy()[0] == pytest.approx(1.0 + 0.1 * 0.3 / (0.3 + 1e-8), rel=1e-14)


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("kwargs,value", [
    (dict(lr=-1e-3), "lr=-0.001"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]=1.0"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]=-0.1"),
    (dict(betas=(0.9,)), r"\(0.9,\)"),
    (dict(eps=-1e-8), "eps=-1e-08"),
    (dict(weight_decay=-0.5), "weight_decay=-0.5"),
])
def test_bad_hyper_parameters_are_named(cls, kwargs, value):
    with pytest.raises(ValueError, match=value):
        getattr(dt.optim, cls)([_param([1.0])], **kwargs)


# ---- the multi-tensor update ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("table", ["compiled", "numpy"])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_one_kernel_call_updates_every_parameter_at_its_own_step(monkeypatch, kernel_calls, dtype, table, kind):
    called = kernel_calls("foreach_adam_step")
    if table == "numpy":
        monkeypatch.setattr(backend.CPU, "kernels", kernels_numpy)
    rng = np.random.default_rng(0)
    shapes = [(33, 17), (17,), (5,), (400, 300)]
    params = [dt.tensor(rng.standard_normal(s), dtype=dtype, requires_grad=True) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    has_grad = [[True, True, False, True], [True, True, True, True], [False, True, True, True]]  # per step
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, amsgrad=True)
    opt = getattr(dt.optim, kind)(params, **hyper)
    expected = [p.numpy().copy() for p in params]
    moments = [[np.zeros_like(e) for e in expected] for _ in range(3)]
    counts = [0] * len(params)
    for step_grads in has_grad:
        for k, p in enumerate(params):
            p.grad = dt.tensor(grads[k], dtype=dtype) if step_grads[k] else None
            if step_grads[k]:
                counts[k] += 1
                kernels_numpy.adam_step(np, expected[k], grads[k], moments[0][k], moments[1][k], moments[2][k],
                                        counts[k], 1e-2, 0.9, 0.99, 1e-8, 0.01, kind == "AdamW")
        opt.step()
    assert called == ([] if table == "numpy" else ["foreach_adam_step"] * 3)  # one call per step for all
    for k, p in enumerate(params):
        np.testing.assert_array_equal(p.numpy(), expected[k])
        assert opt.state[p]["step"] == counts[k] == p._version
        for name, moment in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), moments):
            np.testing.assert_array_equal(opt.state[p][name], moment[k])
