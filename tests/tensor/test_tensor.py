"""Tensor basics: creation and dtype defaults, conversion, detach, repr, comparisons, random state."""
import numpy as np
import pytest

import disttrain as dt


# ---- creation and dtype defaults ----------------------------------------------------------------
@pytest.mark.parametrize("data, dtype", [
    ([1.0, 2.0], dt.float32),                              # Python floats -> float32
    (2.5, dt.float32),
    ([1, 2], dt.int64),                                    # Python ints -> int64
    (3, dt.int64),
    ([True, False], dt.bool_),
    (np.array([1.0, 2.0]), dt.float64),                    # a NumPy float64 array keeps float64
    (np.array([1.0], dtype=np.float32), dt.float32),
    (np.array([1, 2], dtype=np.int32), dt.int64),          # integer arrays become int64 (indices)
    (np.float64(1.5), dt.float64),
])
def test_tensor_dtype_defaults(data, dtype):
    t = dt.tensor(data)
    assert t.dtype == dtype
    np.testing.assert_array_equal(t.numpy(), np.asarray(data))


def test_tensor_copies_its_data_and_from_numpy_shares_it():
    a = np.array([1.0, 2.0])
    t, shared = dt.tensor(a), dt.from_numpy(a)
    a[0] = 10.0
    assert t.numpy()[0] == 1.0 and shared.numpy()[0] == 10.0
    assert dt.tensor(t).numpy() is not t.numpy()
    with pytest.raises(TypeError, match="NumPy"):
        dt.from_numpy([1.0])


def test_explicit_dtype_and_requires_grad():
    t = dt.tensor([1, 2], dtype="float64", requires_grad=True)
    assert t.dtype == dt.float64 and t.requires_grad and t.is_leaf and t.grad is None
    assert dt.tensor([1.5], dtype=dt.int64).numpy().tolist() == [1]


def test_creation_functions():
    assert dt.zeros(2, 3).shape == (2, 3) and dt.zeros(2, 3).dtype == dt.float32
    assert dt.zeros((2, 3)).shape == (2, 3)
    np.testing.assert_array_equal(dt.ones(2, dtype="float64").numpy(), [1.0, 1.0])
    assert dt.ones(2, dtype="float64").dtype == dt.float64
    np.testing.assert_array_equal(dt.full((2,), 7.0).numpy(), [7.0, 7.0])
    assert dt.full(3, 1).shape == (3,) and dt.full(3, 1).dtype == dt.int64  # the fill value says, as torch.full
    x = dt.tensor(np.ones((2, 2)))
    assert dt.zeros_like(x).dtype == dt.float64 and dt.ones_like(x).numpy().sum() == 4
    assert dt.zeros_like(x, dtype="float32").dtype == dt.float32
    assert dt.zeros(2, requires_grad=True).requires_grad
    assert dt.arange(4).dtype == dt.int64 and dt.arange(4).numpy().tolist() == [0, 1, 2, 3]
    assert dt.arange(1, 7, 2).numpy().tolist() == [1, 3, 5]
    assert dt.arange(0, 1, 0.25).dtype == dt.float32
    assert dt.arange(3, dtype="float64").dtype == dt.float64
    r = dt.randn(3, 4)
    assert r.shape == (3, 4) and r.dtype == dt.float32 and r.is_leaf
    assert dt.randn(2, dtype="float64").dtype == dt.float64
    u = dt.rand(1000)
    assert 0 <= u.numpy().min() and u.numpy().max() < 1
    v = dt.uniform((1000,), -2.0, -1.0)
    assert -2 <= v.numpy().min() and v.numpy().max() < -1 and v.dtype == dt.float32
    k = dt.randint(3, 5, (100,))
    assert k.dtype == dt.int64 and set(k.numpy().tolist()) == {3, 4}


# ---- conversion ---------------------------------------------------------------------------------
def test_numpy_item_tolist():
    t = dt.tensor([[1.0, 2.0]])
    assert isinstance(t.numpy(), np.ndarray) and t.tolist() == [[1.0, 2.0]]
    assert dt.tensor([[3.5]]).item() == 3.5 and isinstance(dt.tensor(2).item(), int)
    with pytest.raises(ValueError, match=r"\(1, 2\)"):
        t.item()


def test_to_dtype_is_differentiable():
    x = dt.tensor([1.0, 2.0], requires_grad=True)  # float32
    y = x.to(dtype="float64")
    assert y.dtype == dt.float64 and y.grad_fn is not None
    (y * y).sum().backward()
    assert x.grad.dtype == dt.float32
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])
    assert x.to(dtype="float32") is x and x.float() is x
    assert x.double().dtype == dt.float64
    assert x.to(device="cpu") is x and x.cpu() is x


def test_detach_shares_data():
    x = dt.tensor([1.0, 2.0], requires_grad=True)
    d = x.detach()
    assert d.numpy() is x.numpy() or np.shares_memory(d.numpy(), x.numpy())
    assert not d.requires_grad and d.grad_fn is None


def test_requires_grad_flag():
    x = dt.tensor([1.0])
    assert x.requires_grad_() is x and x.requires_grad
    y = x * 2.0
    with pytest.raises(RuntimeError, match="leaf"):
        y.requires_grad_(False)


def test_metadata():
    t = dt.zeros(2, 3, 4)
    assert t.shape == (2, 3, 4) and t.ndim == 3 and t.numel() == 24 and len(t) == 2
    assert t.size() == (2, 3, 4) and t.size(1) == 3 and t.device == "cpu"
    assert t.flatten().shape == (24,) and t.flatten(1).shape == (2, 12)
    assert t.unsqueeze(-1).shape == (2, 3, 4, 1) and t.unsqueeze(1).shape == (2, 1, 3, 4)
    assert t.unsqueeze(0).squeeze(0).shape == (2, 3, 4)
    assert t.swapaxes(0, 2).shape == (4, 3, 2) and t.T.shape == (4, 3, 2) and t.view(6, 4).shape == (6, 4)
    with pytest.raises(ValueError, match="size 3"):
        t.squeeze(1)


# ---- repr ---------------------------------------------------------------------------------------
def test_repr():
    assert repr(dt.tensor([1.0, 2.0])) == "tensor([1., 2.], dtype=float32)"
    assert repr(dt.tensor([1.0], requires_grad=True)) == "tensor([1.], dtype=float32, requires_grad=True)"
    assert repr(dt.tensor([1.0], requires_grad=True) * 2.0) == "tensor([2.], dtype=float32, grad_fn=Mul)"
    assert repr(dt.tensor([[1, 2], [3, 4]])) == "tensor([[1, 2],\n        [3, 4]], dtype=int64)"
    assert repr(dt.tensor(3.0)) == "tensor(3., dtype=float32)"


# ---- comparisons --------------------------------------------------------------------------------
def test_comparisons_give_bool_tensors_without_grad():
    x = dt.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = dt.tensor([3.0, 2.0, 1.0])
    for result, expected in [(x < y, [True, False, False]), (x <= y, [True, True, False]),
                             (x > y, [False, False, True]), (x >= 2.0, [False, True, True]),
                             (x.eq(y), [False, True, False]), (x == y, [False, True, False]),
                             (x != y, [True, False, True]), (2.0 == x, [False, True, False])]:
        assert result.dtype == dt.bool_ and not result.requires_grad
        assert result.numpy().tolist() == expected
    assert x.argmax().item() == 2 and x.argmax().dtype == dt.int64


def test_equality_with_what_is_not_a_number_is_identity_and_tensors_stay_hashable():
    x = dt.tensor([1.0, 2.0])
    assert (x == None) is False and (x != None) is True and (x == "x") is False   # noqa: E711
    other = dt.tensor([1.0, 2.0])
    assert {x: "x", other: "other"}[other] == "other" and x in [x]
    assert ((dt.tensor([0, 1, 2]) == dt.tensor([0, 2, 2])).float().mean().item()) == pytest.approx(2 / 3)


def test_comparisons_and_argmax_of_zero_dimensional_tensors():
    s = dt.tensor(1.5)
    assert (s < 2.0).item() is True and (s > 2.0).shape == () and repr(s.eq(1.5)) == "tensor(True, dtype=bool)"
    assert dt.tensor([1.0, 5.0, 2.0]).argmax().shape == ()


def test_truth_value():
    assert dt.tensor(1.0) > 0.5
    assert not (dt.tensor([0.2]) > 0.5)
    with pytest.raises(RuntimeError, match="ambiguous"):
        bool(dt.tensor([1.0, 2.0]) > 0.5)


# ---- random state -------------------------------------------------------------------------------
def _draw():
    return np.concatenate([dt.randn(5).numpy(), dt.rand(3).numpy(), dt.uniform((2,), 0, 1).numpy(),
                           dt.randint(0, 100, (4,)).numpy().astype(np.float32),
                           dt.autograd.ops.dropout(dt.ones(6), 0.5).numpy()])


def test_manual_seed_reproducibility():
    dt.manual_seed(1234)
    first = _draw()
    dt.manual_seed(1234)
    np.testing.assert_array_equal(_draw(), first)
    dt.manual_seed(4321)
    assert not np.array_equal(_draw(), first)


def test_get_and_set_rng_state():
    dt.manual_seed(7)
    dt.randn(3)
    state = dt.get_rng_state()
    expected = _draw()
    dt.randn(10)  # move on, then rewind
    dt.set_rng_state(state)
    np.testing.assert_array_equal(_draw(), expected)


def test_rng_state_taken_before_first_draw():
    dt.manual_seed(99)
    state = dt.get_rng_state()
    expected = _draw()
    dt.set_rng_state(state)
    np.testing.assert_array_equal(_draw(), expected)
