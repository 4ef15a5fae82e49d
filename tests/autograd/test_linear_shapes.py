"""linear with an input whose last axis is not the weight's in_features: refused with a message naming both
shapes, for 2-D and folded N-D inputs (from mutation testing: no test read this message)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd import ops


@pytest.mark.parametrize("shape", [(2, 3), (2, 4, 3)])
def test_mismatched_in_features_are_named(shape):
    x, w = dt.tensor(np.zeros(shape)), dt.tensor(np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"linear: input \(\d+, 3\) does not match weight \(5, 4\)"):
        ops.linear(x, w)
