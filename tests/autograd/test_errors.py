"""Bad input: errors name the op and what was wrong (shapes, dtypes, devices), and gradcheck itself fails
on a wrong gradient."""
import re

import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd import Function, OpError, ops
from disttrain.autograd.gradcheck import GradcheckError, gradcheck, gradgradcheck
from autograd_testing import leaf


def _zeros(*shape, dtype="float64"):
    return dt.zeros(*shape, dtype=dtype)


def _names(message, *parts):
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# ---- shapes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("op, name", [
    (lambda a, b: a + b, "Add"), (lambda a, b: a - b, "Sub"), (lambda a, b: a * b, "Mul"),
    (lambda a, b: a / b, "Div"), (lambda a, b: a ** b, "Pow"), (dt.maximum, "Maximum"),
    (lambda a, b: dt.where(np.ones((2, 3), dtype=bool), a, b), "Where"),
])
def test_broadcast_mismatch_names_op_and_both_shapes(op, name):
    with pytest.raises(OpError) as info:
        op(_zeros(2, 3), _zeros(4))
    _names(str(info.value), name, "(2, 3)", "(4,)")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("a_shape, b_shape", [((2, 3), (4, 5)), ((3,), (4,)), ((2, 3), (4,)), ((5,), (4, 2)),
                                              ((2, 2, 3), (3, 2, 4))])
def test_matmul_mismatch_names_both_shapes(a_shape, b_shape):
    with pytest.raises(OpError) as info:
        _zeros(*a_shape) @ _zeros(*b_shape)
    _names(str(info.value), "MatMul", str(a_shape), str(b_shape))


def test_matmul_needs_tensors_with_dimensions():
    with pytest.raises(ValueError, match=r"\(\)"):
        _zeros() @ _zeros(3)


def test_concat_and_stack_mismatch():
    with pytest.raises(OpError) as info:
        dt.concat([_zeros(2, 3), _zeros(2, 4)], axis=0)
    _names(str(info.value), "Concat", "(2, 3)", "(2, 4)")
    with pytest.raises(OpError) as info:
        dt.concat([_zeros(2, 3), _zeros(2)], axis=0)
    _names(str(info.value), "Concat", "(2, 3)", "(2,)")
    with pytest.raises(ValueError, match=re.escape("(2, 3)")):
        dt.stack([_zeros(2, 3), _zeros(3, 2)])
    with pytest.raises(ValueError, match="sum to 4"):
        dt.split(_zeros(5), [2, 2])


def test_reshape_to_a_wrong_size():
    with pytest.raises(OpError) as info:
        _zeros(2, 3).reshape(4)
    _names(str(info.value), "Reshape", "(2, 3)", "(4,)")


def test_permute_with_a_bad_permutation():
    with pytest.raises(OpError, match="Permute"):
        _zeros(2, 3).permute(0, 0)


def test_transpose_names_a_bad_dim_and_a_permutation():
    with pytest.raises(OpError, match=r"transpose: dim 2 .*\(2, 3\)"):
        _zeros(2, 3).transpose(0, 2)
    with pytest.raises(TypeError, match=r"transpose\(dim0, dim1\) swaps two axes, got \(2, 0, 1\).*permute"):
        _zeros(2, 3, 4).transpose(2, 0, 1)


def test_broadcast_to_an_incompatible_shape():
    with pytest.raises(OpError) as info:
        _zeros(2, 3).broadcast_to((4, 3))
    _names(str(info.value), "BroadcastTo", "(2, 3)")


def test_reduction_axis_out_of_range():
    with pytest.raises(OpError, match="axis 2"):
        _zeros(2, 3).sum(axis=2)


def test_index_out_of_range():
    with pytest.raises(OpError, match="GetItem"):
        _zeros(2, 3)[5]


def test_nn_op_shape_errors():
    with pytest.raises(ValueError, match=re.escape("(1, 3, 4, 4)")):
        ops.conv2d(_zeros(1, 3, 4, 4), _zeros(2, 2, 3, 3))
    with pytest.raises(OpError, match="out of range"):
        ops.cross_entropy(_zeros(2, 3), np.array([0, 3]))
    with pytest.raises(OpError, match=re.escape("expected target shape (2,), one class index per row of logits "
                                                "(2, 3), got (3,)")):
        ops.cross_entropy(_zeros(2, 3), np.array([0, 1, 2]))
    with pytest.raises(OpError, match=re.escape("got (2, 1)")):
        ops.cross_entropy(_zeros(2, 3), np.array([[0], [1]]))
    with pytest.raises(OpError, match="class indices \\(an integer dtype\\), got float32"):
        ops.cross_entropy(_zeros(2, 3), np.array([0.0, 0.5], np.float32))   # would be cut to class 0
    with pytest.raises(ValueError, match="mse_loss"):
        ops.mse_loss(_zeros(2), _zeros(3))
    with pytest.raises(ValueError, match="normalized_shape"):
        ops.layer_norm(_zeros(2, 3), 4)
    with pytest.raises(IndexError, match="embedding"):
        ops.embedding(np.array([0, 5]), _zeros(5, 2))
    with pytest.raises(TypeError, match="integers"):
        ops.embedding(np.array([0.0]), _zeros(5, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ops.dropout(_zeros(3), p=1.0)
    with pytest.raises(OpError, match="does not fit"):
        ops.max_pool2d(_zeros(1, 1, 2, 2), 3)
    with pytest.raises(OpError, match="reduction"):
        ops.cross_entropy(_zeros(2, 3), np.array([0, 1]), reduction="avg")


# ---- backward misuse ----------------------------------------------------------------------------
def test_backward_on_a_non_scalar_says_what_to_pass():
    y = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(RuntimeError) as info:
        y.backward()
    _names(str(info.value), "scalar", "gradient=", "(2,)")


def test_backward_gradient_of_the_wrong_shape():
    y = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(RuntimeError, match=re.escape("(3,)")):
        y.backward(dt.zeros(3, dtype="float64"))


def test_backward_on_a_tensor_without_grad():
    with pytest.raises(RuntimeError, match="does not require grad"):
        (_zeros(2) * 2.0).sum().backward()


# ---- dtypes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: a @ b.T,
                                lambda a, b: dt.concat([a, b]), dt.maximum, lambda a, b: ops.mse_loss(a, b)],
                         ids=["add", "mul", "matmul", "concat", "maximum", "mse_loss"])
def test_mixing_float32_and_float64_raises_naming_both(op):
    a, b = dt.ones(2, 3, dtype="float32"), dt.ones(2, 3, dtype="float64")
    with pytest.raises(OpError) as info:
        op(a, b)
    _names(str(info.value), "float32", "float64")


def test_python_and_numpy_scalars_adopt_the_tensor_dtype():
    x = dt.ones(3)  # float32
    for y in (x * 2.5, 2.5 * x, x / 3, x ** 2, 2.0 ** x, x + True, x * np.float64(2.5), np.float64(2.5) * x,
              x / np.sqrt(np.float64(8.0)), x - np.int64(1)):
        assert y.dtype == dt.float32
    np.testing.assert_allclose((x * np.float64(2.5)).numpy(), [2.5] * 3)


def test_a_raw_array_that_would_change_the_dtype_raises():
    x = dt.ones(3)  # float32
    with pytest.raises(OpError) as info:
        x + np.ones(3)
    _names(str(info.value), "Add", "float32", "float64")
    with pytest.raises(OpError, match="int64"):
        np.arange(3) * x
    assert (x * np.ones(3, dtype=np.float32)).dtype == dt.float32
    assert (x * np.array([True, False, True])).dtype == dt.float32  # a mask keeps the dtype


def test_requires_grad_on_integer_tensors_raises():
    with pytest.raises(TypeError, match="floating"):
        dt.tensor([1, 2], requires_grad=True)
    with pytest.raises(TypeError, match="int64"):
        dt.zeros(2, dtype="int64", requires_grad=True)
    with pytest.raises(TypeError, match="floating"):
        dt.arange(3).requires_grad_()


def test_unknown_dtype():
    with pytest.raises(TypeError, match="complex128"):
        dt.zeros(2, dtype="complex128")


# ---- devices ------------------------------------------------------------------------------------
def test_unknown_device():
    with pytest.raises(ValueError, match="tpu"):
        dt.zeros(2, device="tpu")


@pytest.mark.skipif(dt.cuda_available(), reason="checks the message when no GPU is present")
def test_cuda_unavailable_says_why():
    with pytest.raises(RuntimeError, match="cuda"):
        dt.zeros(2, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not dt.cuda_available(), reason="needs a CUDA GPU")
def test_tensors_on_different_devices():
    a, b = dt.ones(3), dt.ones(3, device="cuda")
    with pytest.raises(OpError) as info:
        a + b
    _names(str(info.value), "Add", "cpu", "cuda", ".to(")


# ---- gradcheck itself ---------------------------------------------------------------------------
class _WrongTanh(Function):
    """tanh with a deliberately wrong backward (1 - y instead of 1 - y**2)."""

    saves_output = True

    def forward(self, a):
        return self.xp.tanh(a)

    def backward(self, g):
        return g * (1 - self.output())


class _WrongSecondOrderSquare(Function):
    """x**2 whose backward is right in value but built from a constant, so its own gradient is wrong."""

    saves_inputs = (0,)

    def forward(self, a):
        return a * a

    def backward(self, g):
        (a,) = self.saved_inputs
        return g * 2.0 * a.detach()


def test_gradcheck_catches_a_wrong_gradient():
    x = leaf([0.3, -0.5, 0.9])
    with pytest.raises(GradcheckError, match="input 0"):
        gradcheck(_WrongTanh.apply, [x])
    assert gradcheck(_WrongTanh.apply, [x], raise_exception=False) is False
    assert gradcheck(dt.tanh, [x])


def test_gradgradcheck_catches_a_wrong_second_derivative():
    x = leaf([0.3, -0.5, 0.9])
    assert gradcheck(_WrongSecondOrderSquare.apply, [x])
    with pytest.raises(GradcheckError):
        gradgradcheck(_WrongSecondOrderSquare.apply, [x])


def test_gradcheck_needs_float64():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(dt.tanh, [dt.ones(2, requires_grad=True)])
