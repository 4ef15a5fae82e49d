"""gradcheck of reductions (every axis, tuples, None, keepdims), shape ops, slicing and integer indexing."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import disttrain as dt
from disttrain.autograd import ops
from autograd_testing import FEW, SETTINGS, check, distinct, leaf, seeds, shape_and_axis, shapes, uniform


# ---- reductions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sum", "mean", "var", "var0", "std"])
@SETTINGS
@given(shape_and_axis(), st.booleans(), seeds)
def test_smooth_reductions(name, shape_axis, keepdims, seed):
    shape, axis = shape_axis
    if name in ("var", "std") and _count(shape, axis) < 2:
        return  # unbiased over one element: 0/0, as torch's
    x = uniform(np.random.default_rng(seed), shape)
    if name == "var0":
        check(lambda x: x.var(axis=axis, keepdims=keepdims, correction=0), x)
    else:
        check(lambda x: getattr(x, name)(axis=axis, keepdims=keepdims), x)


def _count(shape, axis):
    axes = range(len(shape)) if axis is None else np.atleast_1d(axis)
    return int(np.prod([shape[a] for a in axes]))


ALL_AXES = [None, 0, 1, 2, -1, -2, -3, (0,), (0, 1), (1, 2), (0, 2), (2, 0), (-1, 0), (0, 1, 2), ()]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", ALL_AXES, ids=str)
def test_every_axis_of_a_3d_tensor(axis, keepdims):
    rng = np.random.default_rng(0)
    x, d = uniform(rng, (2, 3, 4)), distinct(rng, (2, 3, 4))
    for name in ("sum", "mean") + (("var", "std") if axis != () else ()):  # var over no axis: 0/0
        check(lambda x: getattr(x, name)(axis=axis, keepdims=keepdims), x)
    check(lambda x: x.var(axis=axis, keepdims=keepdims, correction=0), x)
    for name in ("amax", "amin"):
        check(lambda x: getattr(x, name)(axis=axis, keepdims=keepdims), d)


@pytest.mark.parametrize("name", ["amax", "amin"])
@SETTINGS
@given(shape_and_axis(), st.booleans(), seeds)
def test_max_min_without_ties(name, shape_axis, keepdims, seed):
    shape, axis = shape_axis
    x = distinct(np.random.default_rng(seed), shape)
    check(lambda x: getattr(x, name)(axis=axis, keepdims=keepdims), x)


@pytest.mark.parametrize("name", ["max", "min"])
@SETTINGS
@given(shapes(min_dims=1, max_dims=3, max_side=3), st.data(), st.booleans(), seeds)
def test_max_min_along_one_dim_values(name, shape, data, keepdims, seed):
    """x.max(dim).values: the gradient goes to the element the indices name."""
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = distinct(np.random.default_rng(seed), shape)
    check(lambda x: getattr(x, name)(dim, keepdims).values, x)


@SETTINGS
@given(shape_and_axis(), st.booleans(), seeds)
def test_reduction_values_and_shapes_match_numpy(shape_axis, keepdims, seed):
    shape, axis = shape_axis
    x = uniform(np.random.default_rng(seed), shape, requires_grad=False)
    a = x.numpy()
    np_axis = axis if axis is None or isinstance(axis, int) else tuple(axis)
    for name, expected in [("sum", a.sum(np_axis, keepdims=keepdims)), ("mean", a.mean(np_axis, keepdims=keepdims)),
                           ("amax", a.max(np_axis, keepdims=keepdims)), ("amin", a.min(np_axis, keepdims=keepdims))]:
        got = getattr(x, name)(axis=axis, keepdims=keepdims)
        assert got.shape == np.shape(expected), name
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-15, err_msg=name)
    got = x.var(axis=axis, keepdims=keepdims, correction=0)
    np.testing.assert_allclose(got.numpy(), a.var(np_axis, keepdims=keepdims), rtol=1e-12, atol=1e-15)


def test_amax_ties_share_the_gradient_evenly():
    x = leaf([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    x.amax(axis=1).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-15)
    y = leaf([4.0, -1.0, -1.0])
    y.min().backward()
    np.testing.assert_array_equal(y.grad.numpy(), [0.0, 0.5, 0.5])


def test_mean_and_var_gradient_values():
    x = leaf([1.0, 2.0, 6.0])
    x.mean().backward()
    np.testing.assert_allclose(x.grad.numpy(), [1 / 3] * 3, rtol=1e-15)
    x.grad = None
    x.var().backward()  # unbiased, as torch's: d/dx_i = 2 (x_i - mean) / (n - 1)
    np.testing.assert_allclose(x.grad.numpy(), 2 * (x.numpy() - 3.0) / 2, rtol=1e-14)
    x.grad = None
    x.var(correction=0).backward()  # population variance: d/dx_i = 2 (x_i - mean) / n
    np.testing.assert_allclose(x.grad.numpy(), 2 * (x.numpy() - 3.0) / 3, rtol=1e-14)


# ---- reshape, transpose, broadcast_to ----------------------------------------------------------
@SETTINGS
@given(shapes(min_dims=0, max_dims=4, max_side=3), st.data(), seeds)
def test_reshape_to_a_random_factorisation(shape, data, seed):
    rng = np.random.default_rng(seed)
    x = uniform(rng, shape)
    n = x.numel()
    first = data.draw(st.sampled_from([f for f in range(1, n + 1) if n % f == 0]))
    target = data.draw(st.sampled_from([(first, -1), (-1, first), (first, n // first), (n,)]))
    w = leaf(rng.standard_normal(np.empty(shape).reshape(target).shape), False)
    check(lambda x: x.reshape(target) * w, x)
    check(lambda x: x.reshape(*target) * w, x)


@SETTINGS
@given(shapes(min_dims=1, max_dims=4, max_side=3), st.randoms(use_true_random=False), seeds)
def test_permute(shape, random, seed):
    x = uniform(np.random.default_rng(seed), shape)
    axes = list(range(len(shape)))
    random.shuffle(axes)
    weights = leaf(np.random.default_rng(seed + 1).standard_normal(tuple(shape[a] for a in axes)), False)
    check(lambda x: x.permute(axes) * weights, x)
    check(lambda x: x.permute(*axes) * weights, x)
    negative = [a - len(shape) for a in axes]
    check(lambda x: x.permute(negative) * weights, x)


@SETTINGS
@given(shapes(min_dims=1, max_dims=4, max_side=3), st.data(), seeds)
def test_transpose_swaps_two_axes(shape, data, seed):
    x = uniform(np.random.default_rng(seed), shape)
    n = len(shape)
    dim0, dim1 = (data.draw(st.integers(-n, n - 1)) for _ in range(2))
    swapped = np.swapaxes(np.empty(shape), dim0, dim1).shape
    check(lambda x: x.transpose(dim0, dim1) * leaf(np.random.default_rng(seed + 1).standard_normal(swapped), False), x)


@FEW
@given(shapes(min_dims=0, max_dims=3, max_side=3), seeds)
def test_T_swapaxes_squeeze_unsqueeze_flatten(shape, seed):
    x = uniform(np.random.default_rng(seed), shape)
    v = np.random.default_rng(seed + 1).standard_normal(shape[::-1])
    check(lambda x: x.T * leaf(v, False), x)
    check(lambda x: (x.unsqueeze(0).unsqueeze(-1) * 2.0).squeeze(-1).squeeze(0), x)
    check(lambda x: x.flatten() * leaf(np.arange(x.numel(), dtype=float), False), x)
    if len(shape) >= 2:
        check(lambda x: x.swapaxes(0, -1) * leaf(np.swapaxes(np.ones(shape), 0, -1).cumsum(), False)
              .reshape(np.swapaxes(np.ones(shape), 0, -1).shape), x)


@st.composite
def broadcast_source_and_target(draw):
    target = draw(shapes(min_dims=0, max_dims=4, max_side=3))
    keep = draw(st.integers(0, len(target)))
    source = tuple(1 if draw(st.booleans()) else n for n in target[len(target) - keep:])
    return source, target


@SETTINGS
@given(broadcast_source_and_target(), seeds)
def test_broadcast_to(shapes_, seed):
    source, target = shapes_
    rng = np.random.default_rng(seed)
    x = uniform(rng, source)
    w = leaf(rng.standard_normal(target), False)
    check(lambda x: x.broadcast_to(target) * w, x)


def test_broadcast_to_gradient_sums_over_broadcast_axes():
    x = leaf([[1.0], [2.0]])  # (2, 1) -> (3, 2, 4)
    x.broadcast_to((3, 2, 4)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[12.0], [12.0]])


# ---- concat, stack, split, unbind ---------------------------------------------------------------
@FEW
@given(shapes(min_dims=1, max_dims=3, max_side=3), st.data(), seeds)
def test_concat_stack_split(shape, data, seed):
    rng = np.random.default_rng(seed)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    other = list(shape)
    other[axis] = data.draw(st.integers(1, 3))
    a, b, c = uniform(rng, shape), uniform(rng, tuple(other)), uniform(rng, shape)
    w = leaf(rng.standard_normal(dt.concat([a, b, c], axis=axis).shape), False)
    check(lambda a, b, c: dt.concat([a, b, c], axis=axis) * w, a, b, c)
    ws = leaf(rng.standard_normal(dt.stack([a, c], axis=axis).shape), False)
    check(lambda a, c: dt.stack([a, c], axis=axis) * ws, a, c)
    n = shape[axis]
    size = data.draw(st.integers(1, n))
    pieces = dt.split(a, size, axis=axis)
    assert [p.shape[axis] for p in pieces] == [size] * (n // size) + ([n % size] if n % size else [])
    check(lambda a: [p * (k + 1.0) for k, p in enumerate(dt.split(a, size, axis=axis))], a)
    check(lambda a: dt.split(a, [n - 1, 1] if n > 1 else [1], axis=axis)[0].exp(), a)


def test_concat_gradient_routes_slices_back():
    a, b = leaf([[1.0, 2.0]]), leaf([[3.0, 4.0], [5.0, 6.0]])
    out = dt.concat([a, b], axis=0)
    (out * leaf([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], False)).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [[1.0, 2.0]])
    np.testing.assert_array_equal(b.grad.numpy(), [[3.0, 4.0], [5.0, 6.0]])


def test_concat_with_a_constant_input():
    a, b = leaf([1.0, 2.0]), leaf([3.0], requires_grad=False)
    check(lambda a: dt.concat([b, a, b]) * leaf([1.0, 2.0, 3.0, 4.0], False), a)


def test_unbind_multi_output_node():
    x = uniform(np.random.default_rng(0), (3, 2))
    check(lambda x: [p * (k + 1.0) for k, p in enumerate(ops.unbind(x, axis=0))], x)
    check(lambda x: ops.unbind(x, axis=1)[1].tanh(), x)  # unused outputs get zero gradient
    x = leaf([[1.0, 2.0], [3.0, 4.0]])
    first, second = ops.unbind(x, axis=1)
    (first * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[3.0, 0.0], [3.0, 0.0]])


# ---- indexing -----------------------------------------------------------------------------------
BASIC_INDICES = [
    (1,), (-1,), (slice(1, 3),), (slice(None, None, -1),), (slice(None, None, -2),),
    (slice(None), 1), (Ellipsis, slice(None, None, -1)), (None, 1, Ellipsis, None),
    (-1, slice(None), None), (slice(1, None), slice(None, None, -1), 0), (Ellipsis,), (0, -1, slice(3, 0, -2)),
]


@pytest.mark.parametrize("index", BASIC_INDICES, ids=[str(i) for i in BASIC_INDICES])
def test_basic_slicing(index):
    x = uniform(np.random.default_rng(0), (3, 4, 5))
    expected = x.numpy()[index]
    assert x[index].shape == expected.shape
    np.testing.assert_array_equal(x[index].numpy(), expected)
    w = leaf(np.random.default_rng(1).standard_normal(expected.shape), False)
    check(lambda x: x[index] * w, x)


ADVANCED_INDICES = [
    (np.array([0, 0, 2, 0]),),                               # repeated rows: scatter-add
    (np.array([[1, 1], [2, 1]]),),                           # 2-D index array
    (np.array([0, 2, 2]), np.array([1, 1, 1])),              # repeated (row, col) pairs
    (slice(None), np.array([3, 0, 3, 3])),                   # mixed basic and advanced
    (np.array([2, 2]), slice(None, None, -1), np.array([0, 0])),
    (np.array([True, False, True]),),                        # boolean mask
]


@pytest.mark.parametrize("index", ADVANCED_INDICES, ids=range(len(ADVANCED_INDICES)))
def test_integer_array_indexing_with_repeats(index):
    x = uniform(np.random.default_rng(0), (3, 4, 2))
    expected = x.numpy()[index]
    np.testing.assert_array_equal(x[index].numpy(), expected)
    w = leaf(np.random.default_rng(1).standard_normal(expected.shape), False)
    check(lambda x: x[index] * w, x)


def test_repeated_indices_accumulate_in_backward():
    x = leaf([10.0, 20.0, 30.0])
    x[dt.tensor([0, 2, 0, 0])].sum().backward()  # an int64 Tensor index works too
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 0.0, 1.0])


def test_indexing_second_order():
    x = uniform(np.random.default_rng(0), (4, 3))
    idx = np.array([1, 1, 3])
    from autograd_testing import check_second_order

    check_second_order(lambda x: (x[idx] ** 3).sum(), x)
