"""Convolution and pooling at the edge of fitting: a kernel exactly the input's size gives one output per
channel; one element too wide or too tall is refused, each side checked on its own (from mutation testing)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd import OpError, ops


def test_a_kernel_the_size_of_the_input_gives_one_output():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((6, 3, 4, 5))
    out = ops.conv2d(dt.tensor(x), dt.tensor(w))
    assert out.shape == (2, 6, 1, 1)
    np.testing.assert_allclose(out.numpy()[:, :, 0, 0], np.einsum("nchw,ochw->no", x, w), rtol=1e-12)
    pooled = ops.max_pool2d(dt.tensor(x), (4, 5))
    np.testing.assert_array_equal(pooled.numpy()[:, :, 0, 0], x.max(axis=(2, 3)))


@pytest.mark.parametrize("kernel", [(5, 5), (4, 6)], ids=["too tall", "too wide"])
def test_a_kernel_larger_than_the_input_on_one_side_is_refused(kernel):
    x = dt.tensor(np.zeros((1, 3, 4, 5)))
    with pytest.raises(OpError, match="does not fit"):
        ops.conv2d(x, dt.tensor(np.zeros((2, 3) + kernel)))
    with pytest.raises(OpError, match="does not fit"):
        ops.max_pool2d(x, kernel)
