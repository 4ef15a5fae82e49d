"""gradcheck of matmul (batch broadcasting, 1-D operands: NumPy matmul semantics) and the fused linear node."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from disttrain.autograd import ops
from autograd_testing import SETTINGS, check, check_second_order, leaf, seeds, uniform


@st.composite
def matmul_shapes(draw):
    """Operand shapes (a, b) for a @ b: 1-D or k-D, with broadcastable batch dimensions."""
    n, k, m = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    a_batch = tuple(1 if draw(st.booleans()) else s for s in batch[len(batch) - draw(st.integers(0, len(batch))):])
    b_batch = tuple(1 if draw(st.booleans()) else s for s in batch[len(batch) - draw(st.integers(0, len(batch))):])
    a = (k,) if draw(st.integers(0, 4)) == 0 else a_batch + (n, k)
    b = (k,) if draw(st.integers(0, 4)) == 0 else b_batch + (k, m)
    return a, b


@SETTINGS
@given(matmul_shapes(), seeds)
def test_matmul_broadcasting_and_vectors(shapes_, seed):
    rng = np.random.default_rng(seed)
    a, b = uniform(rng, shapes_[0]), uniform(rng, shapes_[1])
    expected = np.matmul(a.numpy(), b.numpy())
    out = a @ b
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-14)
    check(lambda a, b: a @ b, a, b)


@pytest.mark.parametrize("a_shape, b_shape", [
    ((3,), (3,)), ((3,), (3, 2)), ((2, 3), (3,)), ((3,), (4, 3, 2)), ((4, 2, 3), (3,)),
    ((2, 1, 2, 3), (5, 3, 2)), ((1, 3), (4, 3, 2)),
])
def test_matmul_named_cases(a_shape, b_shape):
    rng = np.random.default_rng(0)
    check(lambda a, b: a @ b, uniform(rng, a_shape), uniform(rng, b_shape))


def test_matmul_gradient_values():
    a = leaf([[1.0, 2.0], [3.0, 4.0]])
    b = leaf([[5.0], [6.0]])
    (a @ b).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [[5.0, 6.0], [5.0, 6.0]])
    np.testing.assert_array_equal(b.grad.numpy(), [[4.0], [6.0]])


def test_matmul_with_itself():
    a = uniform(np.random.default_rng(0), (3, 3))
    check(lambda a: a @ a, a)
    check(lambda a: a @ a.T, a)


# ---- the fused linear node (x @ w.T + b) --------------------------------------------------------
@pytest.mark.parametrize("x_shape", [(4, 3), (2, 3, 3), (3,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(x_shape, bias):
    rng = np.random.default_rng(0)
    x, w, b = uniform(rng, x_shape), uniform(rng, (5, 3)), uniform(rng, (5,))
    if bias:
        check(lambda x, w, b: ops.linear(x, w, b), x, w, b)
        np.testing.assert_allclose(ops.linear(x, w, b).numpy(), x.numpy() @ w.numpy().T + b.numpy(), rtol=1e-14)
    else:
        check(lambda x, w: ops.linear(x, w), x, w)


def test_linear_second_order():
    rng = np.random.default_rng(0)
    check_second_order(lambda x, w, b: ops.linear(x, w, b).tanh(), uniform(rng, (2, 3)), uniform(rng, (4, 3)),
                       uniform(rng, (4,)))
