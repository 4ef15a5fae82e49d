"""torch's type promotion where a tensor meets a Python scalar (PyTorch as the oracle where installed, the
expected dtypes otherwise): an integer or bool tensor with a Python float, or in a true division, becomes the
default float dtype (float32); a float tensor keeps its dtype; an integer tensor with a Python int stays
integer; full() infers its dtype from the fill value."""
import operator

import numpy as np
import pytest

import disttrain as dt

try:
    import torch  # the oracle where installed
except ImportError:
    torch = None

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "**": operator.pow}

# (tensor dtype, scalar, op) -> the result's dtype, as torch 2.13 gives it
EXPECTED = {("int64", 0.5, op): "float32" for op in OPS}
EXPECTED.update({("int32", 1.5, op): "float32" for op in OPS})
EXPECTED.update({("int64", 2, op): "float32" if op == "/" else "int64" for op in OPS})
EXPECTED.update({("bool", 0.5, op): "float32" for op in ("+", "*", "/", "**")})
EXPECTED.update({("bool", 2, op): "float32" if op == "/" else "int64" for op in ("+", "*", "/", "**")})
EXPECTED.update({("float32", s, op): "float32" for s in (0.5, 2) for op in OPS})
EXPECTED.update({("float64", s, op): "float64" for s in (0.5, 2) for op in OPS})


def _values(dtype):
    return [True, True, True] if dtype == "bool" else [1, 2, 3]  # no zero: scalar / tensor divides


def _torch_dtype(name):
    return getattr(torch, name)


@pytest.mark.parametrize("dtype, scalar, op", sorted(EXPECTED, key=repr), ids=repr)
@pytest.mark.parametrize("scalar_first", [False, True], ids=["tensor-op-scalar", "scalar-op-tensor"])
def test_a_tensor_with_a_python_scalar_promotes_as_torch(dtype, scalar, op, scalar_first):
    x = dt.tensor(np.array(_values(dtype), dtype=dtype))
    args = (scalar, x) if scalar_first else (x, scalar)
    y = OPS[op](*args)
    assert y.dtype == np.dtype(EXPECTED[dtype, scalar, op])
    expected = OPS[op](*((scalar, np.array(_values(dtype), dtype=np.float64)) if scalar_first
                         else (np.array(_values(dtype), dtype=np.float64), scalar)))
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-6)
    if torch is not None:
        t = torch.tensor(_values(dtype), dtype=_torch_dtype(dtype))
        t_y = OPS[op](*((scalar, t) if scalar_first else (t, scalar)))
        assert str(t_y.dtype) == f"torch.{y.dtype}"
        np.testing.assert_allclose(y.numpy(), t_y.numpy(), rtol=1e-6)


def test_integer_tensors_divide_into_the_default_float():
    a, b = dt.tensor([3, 4]), dt.tensor([2, 8])
    assert (a / b).dtype == dt.float32
    np.testing.assert_array_equal((a / b).numpy(), [1.5, 0.5])
    assert (a * b).dtype == dt.int64


def test_an_integer_tensor_with_a_float_tensor_stays_the_dtype_rule_error():
    with pytest.raises(Exception, match="dtype mismatch"):
        dt.tensor([1, 2]) * dt.tensor([0.5, 0.5])


def test_the_float_result_takes_part_in_autograd():
    w = dt.tensor([1.0, 2.0], requires_grad=True)
    (w * (dt.tensor([1, 3]) * 0.5)).sum().backward()
    assert w.grad.dtype == dt.float32
    np.testing.assert_array_equal(w.grad.numpy(), [0.5, 1.5])


@pytest.mark.parametrize("fill, expected", [(3, "int64"), (True, "bool"), (2.5, "float32"), (np.int32(3), "int64"),
                                            (np.float64(1.0), "float32")], ids=repr)
def test_full_infers_its_dtype_from_the_fill_value_as_torch(fill, expected):
    x = dt.full((2,), fill)
    assert x.dtype == np.dtype(expected)
    np.testing.assert_array_equal(x.numpy(), [fill, fill])
    assert dt.full((2,), fill, dtype="float64").dtype == dt.float64
    if torch is not None:
        assert str(torch.full((2,), fill).dtype) == f"torch.{expected}"


def test_zeros_and_ones_stay_float32_by_default():
    assert dt.zeros(2).dtype == dt.ones(2).dtype == dt.zeros(2, dtype=None).dtype == dt.float32
