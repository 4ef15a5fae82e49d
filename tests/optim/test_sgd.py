"""SGD, checked against first steps computed by hand (no torch needed), and its one-call multi-tensor update
against the per-parameter reference kernel."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.tensor import backend, kernels_numpy


def _param(values):
    return dt.tensor(np.array(values), dtype="float64", requires_grad=True)


def _steps(opt, param, grads):
    for g in grads:
        param.grad = dt.tensor(np.array(g), dtype="float64")
        opt.step()
    return param.numpy()


P0, G = np.array([1.0, 2.0]), np.array([0.5, -1.0])


def test_plain_step():
    p = _param(P0)
    np.testing.assert_array_equal(_steps(dt.optim.SGD([p], lr=0.1), p, [G]), P0 - 0.1 * G)


def test_momentum_first_step_copies_the_gradient_undamped():
    p = _param(P0)
    opt = dt.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    _steps(opt, p, [G])
    np.testing.assert_array_equal(opt.state[p]["momentum_buffer"], G)
    np.testing.assert_allclose(p.numpy(), P0 - 0.1 * G, rtol=1e-15)
    _steps(opt, p, [G])  # buf = 0.9 g + (1 - 0.5) g
    np.testing.assert_allclose(opt.state[p]["momentum_buffer"], 1.4 * G, rtol=1e-15)
    np.testing.assert_allclose(p.numpy(), P0 - 0.1 * G - 0.14 * G, rtol=1e-15)


def test_nesterov_looks_ahead_along_the_buffer():
    p = _param(P0)
    _steps(dt.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True), p, [G])
    np.testing.assert_allclose(p.numpy(), P0 - 0.1 * 1.9 * G, rtol=1e-15)


def test_weight_decay_adds_l2_gradient():
    p = _param(P0)
    _steps(dt.optim.SGD([p], lr=0.1, weight_decay=0.01), p, [G])
    np.testing.assert_allclose(p.numpy(), P0 - 0.1 * (G + 0.01 * P0), rtol=1e-15)


def test_maximize_ascends():
    p = _param(P0)
    _steps(dt.optim.SGD([p], lr=0.1, maximize=True), p, [G])
    np.testing.assert_allclose(p.numpy(), P0 + 0.1 * G, rtol=1e-15)


def test_step_leaves_the_gradient_alone():
    p = _param(P0)
    opt = dt.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True)
    _steps(opt, p, [G, G])
    np.testing.assert_array_equal(p.grad.numpy(), G)


@pytest.mark.parametrize("kwargs,value", [
    (dict(lr=-0.1), "-0.1"),
    (dict(lr=0.1, momentum=-0.5), "-0.5"),
    (dict(lr=0.1, weight_decay=-1e-4), "-0.0001"),
    (dict(lr=0.1, nesterov=True), "momentum=0"),
    (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening=0.1"),
])
def test_bad_hyper_parameters_are_named(kwargs, value):
    with pytest.raises(ValueError, match=value):
        dt.optim.SGD([_param(P0)], **kwargs)


# ---- the multi-tensor update ---------------------------------------------------------------------------

def _model_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [dt.tensor(rng.standard_normal(s), dtype=dtype, requires_grad=True)
            for s in [(33, 17), (17,), (5,), (400, 300), (1,)]]


def _per_parameter_steps(params, grads, steps, **hyper):
    """The reference: kernels_numpy.sgd_step on each parameter in turn (the update SGD made before it took
    all parameters in one call)."""
    values = [p.numpy().copy() for p in params]
    buffers = [None] * len(values)
    for _ in range(steps):
        for k, g in enumerate(grads):
            if g is not None:
                buffers[k] = kernels_numpy.sgd_step(np, values[k], g, buffers[k], **hyper)
    return values, buffers


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("table", ["compiled", "numpy"])
def test_one_kernel_call_updates_every_parameter_with_a_gradient(monkeypatch, kernel_calls, dtype, table):
    called = kernel_calls("foreach_sgd_step")
    if table == "numpy":
        monkeypatch.setattr(backend.CPU, "kernels", kernels_numpy)
    params = _model_params(dtype)
    rng = np.random.default_rng(1)
    grads = [None if k == 2 else rng.standard_normal(p.shape).astype(dtype) for k, p in enumerate(params)]
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    expected, expected_buffers = _per_parameter_steps(params, grads, 2, **hyper)
    opt = dt.optim.SGD(params, **hyper)
    for _ in range(2):
        for p, g in zip(params, grads):
            p.grad = None if g is None else dt.tensor(g, dtype=dtype)
        opt.step()
    assert called == ([] if table == "numpy" else ["foreach_sgd_step"] * 2)  # one call per step for all
    for k, p in enumerate(params):
        np.testing.assert_array_equal(p.numpy(), expected[k])
        assert p._version == (0 if grads[k] is None else 2)
        if grads[k] is None:
            assert not opt.state.get(p)         # skipped: no state, as in torch
        else:
            np.testing.assert_array_equal(opt.state[p]["momentum_buffer"], expected_buffers[k])
