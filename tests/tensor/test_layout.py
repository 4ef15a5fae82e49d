"""Memory layouts: the axis order of an array's strides, and new arrays laid out in that order."""
import numpy as np
import pytest

from disttrain.tensor import layout


@pytest.mark.parametrize("make, order", [
    (lambda: np.zeros((2, 3, 4)), (0, 1, 2)),
    (lambda: np.zeros((2, 3, 4)).transpose(1, 0, 2), (1, 0, 2)),
    (lambda: np.zeros((5, 2, 3, 4, 6)).transpose(2, 1, 3, 0, 4), (3, 1, 0, 2, 4)),  # attention's q, k, v
    (lambda: np.asfortranarray(np.zeros((3, 4))), (0, 1)),                         # the last axis stays last
    (lambda: np.zeros(()), ()),
])
def test_axis_order_and_arrays_in_that_order(make, order):
    a = make()
    assert layout.axis_order(a) == order
    b = layout.empty_in_order(np, a.shape, np.float32, order)
    assert b.shape == a.shape and b.dtype == np.float32
    assert layout.axis_order(b) == order
    assert b.transpose(order).flags.c_contiguous       # dense, in that order: transposing back is a view
