import copy
import pickle

import numpy as np
import pytest

import disttrain as dt


def test_parameter_is_a_leaf_tensor_that_requires_grad():
    p = dt.nn.Parameter(dt.ones(2, 3))
    assert isinstance(p, dt.Tensor)
    assert p.requires_grad and p.is_leaf and p.grad is None
    assert p.shape == (2, 3) and p.dtype == dt.float32


def test_parameter_shares_the_tensor_array():
    t = dt.zeros(3)
    p = dt.nn.Parameter(t)
    assert p.data is t.data


def test_parameter_from_numpy_keeps_float64_and_from_list_is_float32():
    assert dt.nn.Parameter(np.zeros(2)).dtype == dt.float64
    assert dt.nn.Parameter([1.0, 2.0]).dtype == dt.float32


def test_parameter_rejects_integer_data():
    with pytest.raises(TypeError, match="floating-point"):
        dt.nn.Parameter(np.arange(3))


def test_parameter_repr_says_parameter():
    assert repr(dt.nn.Parameter(dt.ones(2))).startswith("Parameter containing:\ntensor(")


def test_ops_and_backward_accept_parameters():
    p = dt.nn.Parameter(dt.tensor([1.0, 2.0, 3.0]))
    ((p * p).sum() + (p @ p)).backward()
    np.testing.assert_allclose(p.grad.numpy(), [4.0, 8.0, 12.0])
    assert type(p.detach()) is dt.Tensor


def test_parameter_survives_pickle_and_deepcopy():
    p = dt.nn.Parameter(dt.tensor([1.0, 2.0]))
    (p * 3).sum().backward()
    q = pickle.loads(pickle.dumps(p))
    assert isinstance(q, dt.nn.Parameter) and q.requires_grad
    np.testing.assert_array_equal(q.numpy(), p.numpy())
    r = copy.deepcopy(p)
    assert r.data is not p.data and r.grad.data is not p.grad.data
    np.testing.assert_array_equal(r.grad.numpy(), [3.0, 3.0])
