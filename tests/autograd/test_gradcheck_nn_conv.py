"""gradcheck of the neural-network ops: softmax family, losses, dropout, layer norm, embedding,
conv2d, pooling, unfold/fold; and gradgradcheck of a representative subset."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import disttrain as dt
from disttrain.autograd import ops
from disttrain.autograd.ops import Fold
from autograd_testing import (FEW, check, check_second_order, distinct, leaf, seeds, shape_and_axis, uniform)


# ---- softmax family -----------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [ops.softmax, ops.log_softmax], ids=["softmax", "log_softmax"])
@FEW
@given(shape_and_axis(min_dims=1, max_dims=3), seeds)
def test_softmax_family_over_any_axis(fn, shape_axis, seed):
    shape, axis = shape_axis
    if not isinstance(axis, int):
        axis = -1
    x = uniform(np.random.default_rng(seed), shape, -3.0, 3.0)
    check(lambda x: fn(x, axis=axis), x)


def test_softmax_is_stable_for_large_logits():
    x = leaf([[1000.0, 1001.0, 999.0]])
    np.testing.assert_allclose(ops.softmax(x).numpy().sum(), 1.0, rtol=1e-15)
    assert np.isfinite(ops.log_softmax(x).numpy()).all()
    check(lambda x: ops.log_softmax(x), x)


# ---- cross entropy ------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("extra", [(), (3,), (2, 3)], ids=["NC", "NCd", "NCd1d2"])
def test_cross_entropy(reduction, extra):
    rng = np.random.default_rng(len(extra))
    n, c = 4, 5
    logits = uniform(rng, (n, c) + extra, -2.0, 2.0)
    target = rng.integers(0, c, size=(n,) + extra)
    target.reshape(-1)[::3] = -100  # ignored positions (default ignore_index)
    check(lambda x: ops.cross_entropy(x, target, reduction=reduction), logits)
    check(lambda x: ops.cross_entropy(x, dt.tensor(target), ignore_index=-100, reduction=reduction), logits)


def test_cross_entropy_custom_ignore_index_gets_no_gradient():
    logits = uniform(np.random.default_rng(0), (3, 4))
    target = np.array([1, 3, 0])
    check(lambda x: ops.cross_entropy(x, target, ignore_index=3), logits)
    ops.cross_entropy(logits, target, ignore_index=3).backward()
    np.testing.assert_array_equal(logits.grad.numpy()[1], 0.0)
    assert np.abs(logits.grad.numpy()[[0, 2]]).min() > 0


def test_cross_entropy_value():
    logits = leaf([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    target = np.array([2, 0])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(axis=1, keepdims=True)
    expected = -np.log(p[[0, 1], target])
    np.testing.assert_allclose(ops.cross_entropy(logits, target, reduction="none").numpy(), expected, rtol=1e-14)
    np.testing.assert_allclose(ops.cross_entropy(logits, target).item(), expected.mean(), rtol=1e-14)
    np.testing.assert_allclose(ops.cross_entropy(logits, target, reduction="sum").item(), expected.sum(), rtol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss(reduction):
    rng = np.random.default_rng(0)
    x, y = uniform(rng, (3, 4)), uniform(rng, (3, 4))
    check(lambda x, y: ops.mse_loss(x, y, reduction=reduction), x, y)
    expected = {"mean": np.mean, "sum": np.sum, "none": lambda d: d}[reduction]((x.numpy() - y.numpy()) ** 2)
    np.testing.assert_allclose(ops.mse_loss(x, y, reduction=reduction).numpy(), expected, rtol=1e-14)


# ---- dropout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_dropout_with_a_fixed_seed(p):
    x = uniform(np.random.default_rng(0), (4, 5))

    def fn(x):
        dt.manual_seed(123)  # the same mask in the analytic pass and every numerical pass
        return ops.dropout(x, p=p)

    check(fn, x)
    out = fn(x).numpy()
    kept = out != 0
    assert 0 < kept.sum() < x.numel()
    np.testing.assert_allclose(out[kept], x.numpy()[kept] / (1 - p), rtol=1e-15)
    fn(x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), kept / (1 - p), rtol=1e-15)


def test_dropout_identity_when_not_training_or_p_zero():
    x = uniform(np.random.default_rng(0), (3,))
    assert ops.dropout(x, 0.5, training=False) is x
    assert ops.dropout(x, 0.0) is x


# ---- layer norm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, normalized", [((4, 5), 5), ((2, 3, 4), (3, 4)), ((3, 6), (6,))])
def test_layer_norm(shape, normalized):
    rng = np.random.default_rng(0)
    x = uniform(rng, shape, -2.0, 2.0)
    wshape = (normalized,) if isinstance(normalized, int) else normalized
    w, b = uniform(rng, wshape, 0.5, 1.5), uniform(rng, wshape)
    check(lambda x, w, b: ops.layer_norm(x, normalized, w, b), x, w, b)
    check(lambda x: ops.layer_norm(x, normalized), x)
    axes = tuple(range(len(shape) - len(wshape), len(shape)))
    a = x.numpy()
    expected = (a - a.mean(axes, keepdims=True)) / np.sqrt(a.var(axes, keepdims=True) + 1e-5) * w.numpy() + b.numpy()
    np.testing.assert_allclose(ops.layer_norm(x, normalized, w, b).numpy(), expected, rtol=1e-12)


# ---- embedding ----------------------------------------------------------------------------------
def test_embedding_with_repeated_indices():
    rng = np.random.default_rng(0)
    weight = uniform(rng, (5, 3))
    indices = np.array([[0, 4, 0], [2, 0, 4]])
    w = leaf(rng.standard_normal((2, 3, 3)), False)
    check(lambda weight: ops.embedding(indices, weight) * w, weight)
    ops.embedding(dt.tensor(indices), weight).sum().backward()
    np.testing.assert_array_equal(weight.grad.numpy()[:, 0], [3.0, 0.0, 1.0, 0.0, 2.0])


# ---- convolution and pooling --------------------------------------------------------------------
CONV_CASES = [  # (input shape, weight shape, stride, padding)
    ((2, 2, 5, 4), (3, 2, 3, 2), 1, 0),
    ((1, 3, 6, 5), (2, 3, 3, 3), 2, 1),
    ((2, 1, 7, 6), (2, 1, 2, 3), (2, 1), (1, 2)),
    ((1, 2, 4, 4), (1, 2, 1, 1), 1, 0),
]


@pytest.mark.parametrize("xshape, wshape, stride, padding", CONV_CASES)
def test_conv2d(xshape, wshape, stride, padding):
    rng = np.random.default_rng(0)
    x, w, b = uniform(rng, xshape), uniform(rng, wshape), uniform(rng, (wshape[0],))
    check(lambda x, w, b: ops.conv2d(x, w, b, stride=stride, padding=padding), x, w, b)
    check(lambda x, w: ops.conv2d(x, w, stride=stride, padding=padding), x, w)


def test_conv2d_value_against_direct_loop():
    rng = np.random.default_rng(1)
    x, w, b = uniform(rng, (1, 2, 5, 4)), uniform(rng, (3, 2, 3, 2)), uniform(rng, (3,))
    out = ops.conv2d(x, w, b, stride=(2, 1), padding=(1, 0)).numpy()
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (0, 0)))
    expected = np.zeros((1, 3, 3, 3))
    for o in range(3):
        for i in range(3):
            for j in range(3):
                expected[0, o, i, j] = (xp[0, :, 2 * i:2 * i + 3, j:j + 2] * w.numpy()[o]).sum() + b.numpy()[o]
    np.testing.assert_allclose(out, expected, rtol=1e-13)


@pytest.mark.parametrize("kernel, stride, padding", [(2, None, 0), ((2, 3), 1, 0), (3, 2, 1), ((3, 2), (1, 2), (1, 1))])
def test_max_pool2d(kernel, stride, padding):
    x = distinct(np.random.default_rng(0), (2, 2, 5, 6))
    check(lambda x: ops.max_pool2d(x, kernel, stride, padding), x)


@pytest.mark.parametrize("kernel, stride, padding", [(2, None, 0), ((2, 3), 1, 0), (3, 2, 1), ((3, 2), (1, 2), (1, 1))])
def test_avg_pool2d(kernel, stride, padding):
    x = uniform(np.random.default_rng(0), (2, 2, 5, 6))
    check(lambda x: ops.avg_pool2d(x, kernel, stride, padding), x)


def test_pool_values():
    x = leaf(np.arange(16.0).reshape(1, 1, 4, 4))
    np.testing.assert_array_equal(ops.max_pool2d(x, 2).numpy(), [[[[5, 7], [13, 15]]]])
    np.testing.assert_array_equal(ops.avg_pool2d(x, 2).numpy(), [[[[2.5, 4.5], [10.5, 12.5]]]])
    # zero padding counts in the average (PyTorch's count_include_pad=True)
    np.testing.assert_allclose(ops.avg_pool2d(x, 2, 2, 1).numpy()[0, 0, 0, 0], 0 / 4)
    np.testing.assert_allclose(ops.avg_pool2d(x, 2, 2, 1).numpy()[0, 0, 1, 1], (5 + 6 + 9 + 10) / 4)


UNFOLD_CASES = [((2, 2, 4, 5), (2, 3), (1, 1), (0, 0)), ((1, 3, 5, 5), (3, 3), (2, 2), (1, 1)),
                ((1, 1, 6, 4), (2, 1), (3, 1), (0, 2))]


@pytest.mark.parametrize("shape, kernel, stride, padding", UNFOLD_CASES)
def test_unfold_fold(shape, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = uniform(rng, shape)
    check(lambda x: ops.unfold(x, kernel, stride, padding), x)
    cols_shape = ops.unfold(x, kernel, stride, padding).shape
    cols = uniform(rng, cols_shape)

    def fold(c):
        return Fold.apply(c, in_shape=shape, kernel=kernel, stride=stride, padding=padding)

    check(fold, cols)
    # adjoint: <unfold(x), cols> == <x, fold(cols)>
    lhs = (ops.unfold(x, kernel, stride, padding).numpy() * cols.numpy()).sum()
    rhs = (x.numpy() * fold(cols).numpy()).sum()
    np.testing.assert_allclose(lhs, rhs, rtol=1e-13)


# ---- second order -------------------------------------------------------------------------------
SECOND_ORDER = {
    "tanh": (lambda x: x.tanh(), [(3, 2)]),
    "sigmoid": (lambda x: x.sigmoid(), [(3, 2)]),
    "exp": (lambda x: x.exp(), [(3, 2)]),
    "mul": (lambda x, y: x * y * x, [(3, 2), (2,)]),
    "matmul": (lambda a, b: (a @ b) * (a @ b), [(2, 3, 4), (4, 2)]),
    "softmax": (lambda x: ops.softmax(x, axis=-1), [(2, 4)]),
    "log_softmax": (lambda x: ops.log_softmax(x, axis=0), [(3, 4)]),
    "cross_entropy": (lambda x: ops.cross_entropy(x, np.array([1, -100, 3])), [(3, 4)]),
    "cross_entropy_sum_none": (lambda x: ops.cross_entropy(x, np.array([1, 0, 3]), reduction="none") ** 2, [(3, 4)]),
    "conv2d": (lambda x, w: ops.conv2d(x, w, stride=2, padding=1) ** 2, [(1, 2, 4, 3), (2, 2, 2, 2)]),
    "layer_norm": (lambda x, w: ops.layer_norm(x, 4, w), [(3, 4), (4,)]),
    "var": (lambda x: x.var(axis=1), [(2, 3)]),
    "avg_pool": (lambda x: ops.avg_pool2d(x, 2, 1) ** 2, [(1, 1, 3, 3)]),
}


@pytest.mark.parametrize("name", sorted(SECOND_ORDER))
def test_gradgradcheck(name):
    fn, shapes_ = SECOND_ORDER[name]
    rng = np.random.default_rng(0)
    check_second_order(fn, *[uniform(rng, s) for s in shapes_])


@pytest.mark.parametrize("name, fn, low, high", [
    ("log", lambda x: x.log(), 0.5, 2.0),
    ("div", lambda x, y: x / y, 0.5, 2.0),
    ("pow_scalar", lambda x: x ** 2.5, 0.5, 2.0),
    ("pow_tensor", lambda x, y: x ** y, 0.5, 2.0),
    ("scalar_base", lambda x: 1.5 ** x, 0.5, 2.0),
])
def test_gradgradcheck_positive_domain(name, fn, low, high):
    rng = np.random.default_rng(0)
    n_args = fn.__code__.co_argcount
    check_second_order(fn, *[uniform(rng, (2, 3), low, high) for _ in range(n_args)])
