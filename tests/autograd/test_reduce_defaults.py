"""ops.sum and ops.mean called with their defaults drop the reduced axes, as NumPy and PyTorch do (from mutation
testing: every caller passed keepdims itself)."""
import numpy as np

import disttrain as dt
from disttrain.autograd import ops


def test_reductions_drop_the_reduced_axes_by_default():
    a = np.arange(6.0).reshape(2, 3)
    for op, reference in ((ops.sum, np.sum), (ops.mean, np.mean)):
        assert op(dt.tensor(a)).shape == ()
        assert op(dt.tensor(a), axis=1).shape == (2,)
        np.testing.assert_allclose(op(dt.tensor(a), axis=0).numpy(), reference(a, axis=0), rtol=1e-15)
