"""gradcheck of the Transformer's ops: GELU (tanh form), masked / causal softmax, batched (4-D) matmul;
their values and edge cases (fully masked rows, huge scores, bad masks)."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import disttrain as dt
from disttrain.autograd import ops
from autograd_testing import FEW, check, check_second_order, leaf, seeds, uniform


# ---- GELU ---------------------------------------------------------------------------------------
def gelu_tanh_reference(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@FEW
@given(st.lists(st.integers(1, 4), min_size=0, max_size=3), seeds)
def test_gelu_gradcheck_any_shape(shape, seed):
    x = uniform(np.random.default_rng(seed), tuple(shape), -4.0, 4.0)
    np.testing.assert_allclose(ops.gelu(x).numpy(), gelu_tanh_reference(x.numpy()), rtol=1e-14, atol=1e-300)
    check(ops.gelu, x)


def test_gelu_second_order_and_tails():
    check_second_order(ops.gelu, uniform(np.random.default_rng(0), (3, 4), -3.0, 3.0))
    x = leaf([-40.0, -6.0, 0.0, 6.0, 40.0])
    y = ops.gelu(x)
    np.testing.assert_allclose(y.numpy(), [0.0, gelu_tanh_reference(-6.0), 0.0, gelu_tanh_reference(6.0), 40.0],
                               rtol=1e-15, atol=1e-30)
    y.sum().backward()
    assert np.isfinite(x.grad.numpy()).all() and x.grad.numpy()[-1] == 1.0 and x.grad.numpy()[0] == 0.0


def test_gelu_float32_keeps_its_dtype_and_refuses_the_erf_form():
    x = dt.randn(3, 2)
    assert ops.gelu(x).dtype == dt.float32 and dt.nn.functional.gelu(x).dtype == dt.float32
    with pytest.raises(ValueError, match="approximate='none' is not available"):
        ops.gelu(x, approximate="none")
    with pytest.raises(ValueError, match="approximate='none' is not available"):
        dt.nn.GELU(approximate="none")


# ---- masked / causal softmax ---------------------------------------------------------------------
def causal(q, k):
    return np.tri(q, k, dtype=bool)


@pytest.mark.parametrize("shape", [(4, 4), (2, 3, 5, 5), (3, 2, 4)], ids=["TT", "BHTT", "BTqTk"])
def test_causal_softmax_gradcheck_and_values(shape):
    rng = np.random.default_rng(sum(shape))
    x = uniform(rng, shape, -3.0, 3.0)
    y = ops.masked_softmax(x, causal=True).numpy()
    keep = causal(shape[-2], shape[-1])
    z = np.where(keep, x.numpy(), -np.inf)
    expected = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(y, expected / expected.sum(-1, keepdims=True), rtol=1e-14)
    assert (y[..., ~keep] == 0).all()
    check(lambda x: ops.masked_softmax(x, causal=True), x)


@pytest.mark.parametrize("mask_shape", [(5,), (3, 5), (2, 1, 5), (2, 3, 5)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_broadcast_masks_gradcheck(mask_shape, kind):
    rng = np.random.default_rng(len(mask_shape))
    x = uniform(rng, (2, 3, 5), -3.0, 3.0)
    keep = rng.random(mask_shape) < 0.6
    keep[..., 0] = True  # every row keeps an entry
    mask = keep if kind == "bool" else np.where(keep, rng.uniform(-1, 1, mask_shape), -np.inf)
    y = ops.masked_softmax(x, mask).numpy()
    assert (y[np.broadcast_to(~keep, y.shape)] == 0).all()
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-14)
    check(lambda x: ops.masked_softmax(x, mask), x)
    check(lambda x: ops.masked_softmax(x, dt.tensor(mask), causal=True), x)  # a Tensor mask, with causal too


def test_a_row_with_every_entry_masked_is_zero_and_passes_no_gradient():
    x = uniform(np.random.default_rng(0), (3, 4), -1.0, 1.0)
    keep = np.array([[True, False, True, False], [False] * 4, [True] * 4])
    y = ops.masked_softmax(x, keep)
    np.testing.assert_array_equal(y.numpy()[1], 0.0)
    (y * dt.tensor(np.arange(12.0).reshape(3, 4))).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy()[1], 0.0)
    assert np.isfinite(x.grad.numpy()).all()
    check(lambda x: ops.masked_softmax(x, keep), x)


def test_masked_softmax_is_stable_and_equals_softmax_without_a_mask():
    x = leaf([[1000.0, 1001.0, -1000.0], [3.0, -2.0, 0.5]])
    y = ops.masked_softmax(x, np.array([True, True, False]))
    np.testing.assert_allclose(y.numpy().sum(-1), 1.0, rtol=1e-15)
    assert y.numpy()[0, 2] == 0.0
    np.testing.assert_array_equal(ops.masked_softmax(x).numpy(), ops.softmax(x).numpy())
    check_second_order(lambda x: ops.masked_softmax(x, causal=True), uniform(np.random.default_rng(1), (3, 3)))


def test_masked_softmax_refuses_bad_masks():
    x = dt.randn(2, 3)
    with pytest.raises(TypeError, match="mask must be boolean .* got dtype int64"):
        ops.masked_softmax(x, np.ones((2, 3), dtype=np.int64))
    with pytest.raises(dt.autograd.OpError, match="dtype mismatch float32 tensor vs float64 array"):
        ops.masked_softmax(x, np.zeros((2, 3)))
    with pytest.raises(dt.autograd.OpError, match=r"MaskedSoftmax: .*input shapes: \(2, 3\), \(4,\)"):
        ops.masked_softmax(x, np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="causal needs"):
        ops.masked_softmax(dt.randn(3), causal=True)


# ---- batched matmul, as attention uses it --------------------------------------------------------
@pytest.mark.parametrize("a_shape, b_shape", [((2, 3, 5, 4), (2, 3, 4, 5)), ((2, 3, 5, 5), (2, 3, 5, 4)),
                                              ((2, 1, 5, 4), (3, 4, 2)), ((5, 4), (2, 3, 4, 2))])
def test_batched_matmul_four_d(a_shape, b_shape):
    rng = np.random.default_rng(0)
    a, b = uniform(rng, a_shape), uniform(rng, b_shape)
    np.testing.assert_allclose((a @ b).numpy(), np.matmul(a.numpy(), b.numpy()), rtol=1e-14)
    check(lambda a, b: a @ b, a, b)
