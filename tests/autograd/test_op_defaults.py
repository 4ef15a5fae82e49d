"""Ops called with their defaults behave as NumPy's and PyTorch's: sum and mean drop the reduced axes, concat
joins along axis 0, unfold slides by one without padding (from mutation testing: every caller passed these
arguments itself)."""
import numpy as np

import disttrain as dt
from disttrain.autograd import ops


def test_reductions_drop_the_reduced_axes_by_default():
    a = np.arange(6.0).reshape(2, 3)
    for op, reference in ((ops.sum, np.sum), (ops.mean, np.mean)):
        assert op(dt.tensor(a)).shape == ()
        assert op(dt.tensor(a), axis=1).shape == (2,)
        np.testing.assert_allclose(op(dt.tensor(a), axis=0).numpy(), reference(a, axis=0), rtol=1e-15)


def test_concat_joins_along_the_first_axis_by_default():
    a, b = np.arange(6.0).reshape(2, 3), np.arange(3.0).reshape(1, 3)
    np.testing.assert_array_equal(ops.concat([dt.tensor(a), dt.tensor(b)]).numpy(), np.concatenate([a, b]))


def test_unfold_slides_by_one_without_padding_by_default():
    x = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    cols = ops.unfold(dt.tensor(x), 2).numpy()                # (N, C*2*2, 3*4): every 2x2 window
    assert cols.shape == (2, 12, 12)
    np.testing.assert_array_equal(cols[:, :, 0].reshape(2, 3, 2, 2), x[:, :, :2, :2])
