"""gradcheck of the elementwise ops, with broadcasting in every binary op, and where/clip/maximum."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import disttrain as dt
from autograd_testing import (FEW, MARGIN, SETTINGS, away_from_zero, broadcast_pairs, check, grid_pair, leaf,
                              seeds, shapes, uniform)


# ---- binary ops under broadcasting --------------------------------------------------------------
@SETTINGS
@given(broadcast_pairs(), seeds)
def test_add_sub_mul_broadcast(shape_pair, seed):
    rng = np.random.default_rng(seed)
    a, b = uniform(rng, shape_pair[0]), uniform(rng, shape_pair[1])
    check(lambda a, b: a + b, a, b)
    check(lambda a, b: a - b, a, b)
    check(lambda a, b: a * b, a, b)


@SETTINGS
@given(broadcast_pairs(), seeds)
def test_div_broadcast(shape_pair, seed):
    rng = np.random.default_rng(seed)
    a, b = uniform(rng, shape_pair[0]), away_from_zero(rng, shape_pair[1], low=0.5)
    check(lambda a, b: a / b, a, b)


@SETTINGS
@given(broadcast_pairs(), seeds)
def test_pow_tensor_exponent_broadcast(shape_pair, seed):
    rng = np.random.default_rng(seed)
    base, exponent = uniform(rng, shape_pair[0], 0.5, 2.0), uniform(rng, shape_pair[1], -2.0, 2.0)
    check(lambda a, b: a ** b, base, exponent)


@SETTINGS
@given(broadcast_pairs(), seeds)
def test_maximum_broadcast(shape_pair, seed):
    rng = np.random.default_rng(seed)
    a, b = grid_pair(rng, *shape_pair)
    check(dt.maximum, a, b)
    check(dt.maximum, b, a)


@SETTINGS
@given(broadcast_pairs(), st.integers(0, 3), seeds)
def test_where_broadcast(shape_pair, cond_ndim, seed):
    rng = np.random.default_rng(seed)
    a, b = uniform(rng, shape_pair[0]), uniform(rng, shape_pair[1])
    out_shape = np.broadcast_shapes(*shape_pair)
    cond = rng.random(size=out_shape[len(out_shape) - min(cond_ndim, len(out_shape)):]) < 0.5
    check(lambda a, b: dt.where(cond, a, b), a, b)


@pytest.mark.parametrize("op", [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b,
                                lambda a, b: a / b, dt.maximum], ids=["add", "sub", "mul", "div", "maximum"])
def test_broadcast_gradients_are_summed_back_to_input_shapes(op):
    a = leaf([[1.0], [2.0], [3.0]])          # (3, 1)
    b = leaf([10.5, 20.5, 30.5, 40.5])      # (4,)
    op(a, b).sum().backward()
    assert a.grad.shape == (3, 1) and b.grad.shape == (4,)
    ga = np.zeros((3, 1))
    gb = np.zeros(4)
    av, bv = a.numpy(), b.numpy()
    for i in range(3):
        for j in range(4):  # d op(a_i, b_j) / da_i and / db_j, summed over the broadcast pairs
            h = 1e-6
            ga[i, 0] += (op(leaf(av[i, 0] + h, False), leaf(bv[j], False)).item()
                         - op(leaf(av[i, 0] - h, False), leaf(bv[j], False)).item()) / (2 * h)
            gb[j] += (op(leaf(av[i, 0], False), leaf(bv[j] + h, False)).item()
                      - op(leaf(av[i, 0], False), leaf(bv[j] - h, False)).item()) / (2 * h)
    np.testing.assert_allclose(a.grad.numpy(), ga, rtol=1e-7)
    np.testing.assert_allclose(b.grad.numpy(), gb, rtol=1e-7)


def test_add_of_a_tensor_to_itself_counts_twice():
    x = leaf([1.0, 2.0])
    (x + x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0])


# ---- scalar operands ----------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [
    lambda x: x + 2.5, lambda x: 2.5 + x, lambda x: x - 1.5, lambda x: 1.5 - x, lambda x: 3 * x,
    lambda x: x * -0.5, lambda x: x / 4.0, lambda x: 2.0 / x, lambda x: -x,
    lambda x: x ** 3, lambda x: x ** 2.5, lambda x: x ** -1.5, lambda x: x ** 0.5, lambda x: x.sqrt(),
    lambda x: 2.0 ** x, lambda x: 0.5 ** x,
], ids=["add", "radd", "sub", "rsub", "rmul", "mul", "div", "rdiv", "neg",
        "pow3", "pow2.5", "pow-1.5", "pow0.5", "sqrt", "scalar_base2", "scalar_base0.5"])
@FEW
@given(shapes(), seeds)
def test_ops_with_python_scalars(fn, shape, seed):
    rng = np.random.default_rng(seed)
    check(fn, uniform(rng, shape, 0.5, 2.0))  # positive: fractional powers and 1/x are smooth there


def test_pow_negative_base_integer_exponent():
    check(lambda x: x ** 3, leaf([-1.5, -0.3, 0.7]))
    check(lambda x: x ** 2, leaf([-1.5, -0.3, 0.7]))


def test_pow_gradient_values():
    x = leaf([1.0, 2.0, 3.0])
    e = leaf([2.0, 0.5, -1.0])
    (x ** e).sum().backward()
    xv, ev = x.numpy(), e.numpy()
    np.testing.assert_allclose(x.grad.numpy(), ev * xv ** (ev - 1), rtol=1e-14)
    np.testing.assert_allclose(e.grad.numpy(), xv ** ev * np.log(xv), rtol=1e-14)


# ---- unary ops ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, fn, low, high", [
    ("neg", lambda x: -x, -2.0, 2.0),
    ("exp", dt.exp, -3.0, 3.0),
    ("log", dt.log, 0.2, 5.0),
    ("tanh", dt.tanh, -3.0, 3.0),
    ("sigmoid", dt.sigmoid, -6.0, 6.0),
    ("sigmoid_saturated", dt.sigmoid, 20.0, 40.0),
    ("sigmoid_saturated_negative", dt.sigmoid, -40.0, -20.0),
])
@FEW
@given(shapes(), seeds)
def test_smooth_unary(name, fn, low, high, shape, seed):
    rng = np.random.default_rng(seed)
    check(fn, uniform(rng, shape, low, high))


@pytest.mark.parametrize("name, fn", [("relu", dt.relu), ("abs", lambda x: x.abs())])
@FEW
@given(shapes(), seeds)
def test_kinked_unary_away_from_zero(name, fn, shape, seed):
    rng = np.random.default_rng(seed)
    check(fn, away_from_zero(rng, shape))


def test_relu_and_abs_gradient_values():
    x = leaf([-2.0, -0.5, 0.5, 3.0])
    (x.relu() * leaf([1.0, 2.0, 3.0, 4.0], False)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 0.0, 3.0, 4.0])
    x.grad = None
    x.abs().sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [-1.0, -1.0, 1.0, 1.0])


@pytest.mark.parametrize("lo, hi", [(-0.5, 0.5), (None, 0.3), (-0.3, None)])
@FEW
@given(shapes(), seeds)
def test_clip_away_from_bounds(lo, hi, shape, seed):
    rng = np.random.default_rng(seed)
    values = rng.uniform(-1.0, 1.0, size=shape)
    for bound in (lo, hi):
        if bound is not None:  # push values within MARGIN of a bound out to MARGIN
            near = np.abs(values - bound) < MARGIN
            values = np.where(near, bound + np.where(values >= bound, MARGIN, -MARGIN), values)
    check(lambda x: x.clip(lo, hi), leaf(values))


def test_clip_gradient_is_one_inside_zero_outside_bounds_inclusive():
    x = leaf([-2.0, -1.0, 0.0, 1.0, 2.0])
    x.clip(-1.0, 1.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 1.0, 1.0, 1.0, 0.0])


def test_maximum_ties_split_the_gradient():
    a, b = leaf([1.0, 2.0, 3.0]), leaf([1.0, 1.0, 5.0])
    dt.maximum(a, b).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(b.grad.numpy(), [0.5, 0.0, 1.0])


def test_where_gradient_values():
    a, b = leaf([1.0, 2.0, 3.0]), leaf([4.0])
    cond = dt.tensor([True, False, True])
    dt.where(cond, a, b).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(b.grad.numpy(), [1.0])


@pytest.mark.parametrize("fn", [dt.relu, lambda x: x.abs(), lambda x: x.max(), lambda x: x.min(),
                                lambda x: dt.maximum(x, x * 0.5), lambda x: x.clip(-1.0, 1.0), dt.tanh],
                         ids=["relu", "abs", "max", "min", "maximum", "clip", "tanh"])
def test_zero_dimensional_inputs(fn):
    check(fn, leaf(0.7))
    check(fn, leaf(-0.6))
