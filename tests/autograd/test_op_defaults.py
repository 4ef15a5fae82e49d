"""Ops called with their defaults behave as NumPy's and PyTorch's: sum and mean drop the reduced axes, concat
joins along axis 0, unfold slides by one without padding (from mutation testing: every caller passed these
arguments itself)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd import ops

try:
    import torch  # the oracle where installed
except ImportError:
    torch = None


def test_reductions_drop_the_reduced_axes_by_default():
    a = np.arange(6.0).reshape(2, 3)
    for op, reference in ((ops.sum, np.sum), (ops.mean, np.mean)):
        assert op(dt.tensor(a)).shape == ()
        assert op(dt.tensor(a), axis=1).shape == (2,)
        np.testing.assert_allclose(op(dt.tensor(a), axis=0).numpy(), reference(a, axis=0), rtol=1e-15)


@pytest.mark.parametrize("name, whole", [("sum", 15.0), ("mean", 2.5), ("amax", 5.0), ("amin", 0.0),
                                         ("var", 3.5), ("std", 3.5 ** 0.5)])
@pytest.mark.parametrize("spelling", [lambda f: f(()), lambda f: f(dim=()), lambda f: f(dim=[], keepdim=True)],
                         ids=["()", "dim=()", "dim=[]-keepdim"])
def test_an_empty_tuple_of_dims_reduces_every_axis_as_torch(name, whole, spelling):
    """torch reduces over every axis for dim=() (NumPy's axis=() reduces none); the gradient is that of the
    whole reduction. (torch 2.13's var/std backward for dim=() divides by N - 1 with N = 1, giving +-inf,
    against its own forward: their gradients are compared with the whole reduction's only.)"""
    a = np.arange(6.0).reshape(2, 3)
    x = dt.tensor(a, requires_grad=True)
    y = spelling(getattr(x, name))
    y.sum().backward()
    assert y.shape in ((), (1, 1))
    np.testing.assert_allclose(y.numpy().ravel(), [whole], rtol=1e-15)
    x_all = dt.tensor(a, requires_grad=True)
    getattr(x_all, name)().backward()
    np.testing.assert_allclose(x.grad.numpy(), x_all.grad.numpy(), rtol=1e-15)
    if torch is not None:
        t = torch.tensor(a, requires_grad=True)
        t_y = spelling(getattr(t, name))
        assert tuple(t_y.shape) == y.shape
        np.testing.assert_allclose(y.numpy(), t_y.detach().numpy(), rtol=1e-15)
        if name not in ("var", "std"):
            t_y.sum().backward()
            np.testing.assert_allclose(x.grad.numpy(), t.grad.numpy(), rtol=1e-15)


def test_max_and_min_over_an_empty_tuple_are_the_whole_tensor_extremes():
    x = dt.tensor(np.arange(6.0).reshape(2, 3))
    assert x.max(()).item() == 5.0 and x.min(dim=()).item() == 0.0


def test_concat_joins_along_the_first_axis_by_default():
    a, b = np.arange(6.0).reshape(2, 3), np.arange(3.0).reshape(1, 3)
    np.testing.assert_array_equal(ops.concat([dt.tensor(a), dt.tensor(b)]).numpy(), np.concatenate([a, b]))


def test_unfold_slides_by_one_without_padding_by_default():
    x = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    cols = ops.unfold(dt.tensor(x), 2).numpy()                # (N, C*2*2, 3*4): every 2x2 window
    assert cols.shape == (2, 12, 12)
    np.testing.assert_array_equal(cols[:, :, 0].reshape(2, 3, 2, 2), x[:, :, :2, :2])
