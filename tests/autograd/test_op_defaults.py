"""Ops called with their defaults behave as NumPy's and PyTorch's: sum and mean drop the reduced axes, concat
joins along axis 0 (from mutation testing: every caller passed these arguments itself)."""
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
