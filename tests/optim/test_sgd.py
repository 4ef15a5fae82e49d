"""SGD, checked against first steps computed by hand (no torch needed)."""
import numpy as np
import pytest

import disttrain as dt


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
