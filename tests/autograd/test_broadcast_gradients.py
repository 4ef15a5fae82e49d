"""Gradients of broadcast products summed back to each operand's shape when the small operand has fewer axes
AND size-1 axes past the first, or a size-1 axis kept where another is broadcast (from mutation testing: the
raw-array path of Mul's backward missed both)."""
import numpy as np
import pytest

import disttrain as dt


@pytest.mark.parametrize("big,small", [((2, 3, 4), (3, 1)), ((2, 3, 4, 5), (1, 4, 1)), ((5, 2, 3), (2, 1)),
                                       ((2, 5, 1), (2, 1, 1))])
def test_mul_gradient_sums_over_leading_and_broadcast_axes(big, small):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(big), rng.standard_normal(small)
    ta, tb = dt.tensor(a, requires_grad=True), dt.tensor(b, requires_grad=True)
    (ta * tb).sum().backward()
    np.testing.assert_allclose(ta.grad.numpy(), np.broadcast_to(b, big), rtol=1e-15)
    lead = len(big) - len(small)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(small) if n == 1)
    np.testing.assert_allclose(tb.grad.numpy(), a.sum(axis=axes).reshape(small), rtol=1e-12)
