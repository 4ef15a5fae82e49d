"""Version counters: in-place changes to tensors saved for backward are detected; in-place ops on
tensors that take part in autograd are refused while grad mode is on."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd import ops
from autograd_testing import leaf, uniform


# ---- saved tensors modified between forward and backward ----------------------------------------
def test_modifying_a_saved_input_raises_naming_the_op():
    x, w = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    out = (x * w).sum()
    with dt.no_grad():
        x.mul_(2)
    with pytest.raises(RuntimeError, match=r"Mul.*modified in place"):
        out.backward()


def test_optimizer_style_update_of_a_parameter_before_backward_raises():
    rng = np.random.default_rng(0)
    w = uniform(rng, (3, 2))
    x = uniform(rng, (4, 3), requires_grad=False)
    loss = (x @ w).tanh().sum()
    with dt.no_grad():
        w.sub_(uniform(rng, (3, 2), requires_grad=False), alpha=0.1)
    with pytest.raises(RuntimeError, match="MatMul"):
        loss.backward()


def test_modifying_a_saved_output_raises():
    x = leaf([0.1, 0.2])
    y = x.exp()  # exp's backward reads its output; add saves nothing
    loss = (y + 2.0).sum()
    with dt.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="Exp"):
        loss.backward()


@pytest.mark.parametrize("modify", [
    lambda t: t.add_(1.0), lambda t: t.sub_(1.0), lambda t: t.mul_(2.0), lambda t: t.div_(2.0),
    lambda t: t.zero_(), lambda t: t.fill_(3.0), lambda t: t.copy_(dt.tensor(np.array([5.0, 6.0]))),
    lambda t: t.__setitem__(0, 7.0),
], ids=["add_", "sub_", "mul_", "div_", "zero_", "fill_", "copy_", "setitem"])
def test_every_in_place_op_bumps_the_version(modify):
    x, w = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    out = (x * w).sum()
    with dt.no_grad():
        modify(w)
    with pytest.raises(RuntimeError, match="Mul"):
        out.backward()


def test_modifying_an_unsaved_tensor_is_fine():
    x, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    out = (x * 2.0 + b).sum()  # add saves neither input; mul by a constant saves x
    with dt.no_grad():
        b.add_(100.0)
    out.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0])
    np.testing.assert_array_equal(b.grad.numpy(), [1.0, 1.0])


def test_modifying_after_backward_is_fine():
    x, w = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    (x * w).sum().backward()
    with dt.no_grad():
        w.sub_(w.grad, alpha=0.1)  # the usual optimizer step
    (x * w).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3.0 + 2.9, 4.0 + 3.8], rtol=1e-15)


# ---- views and detach share the version counter ---------------------------------------------------
@pytest.mark.parametrize("view", [lambda w: w.T, lambda w: w.reshape((2, 3)).reshape((3, 2)),
                                  lambda w: w[::-1], lambda w: w.transpose(1, 0).T],
                         ids=["T", "reshape", "slice", "transpose"])
def test_update_of_a_parameter_used_through_a_view_raises(view):
    rng = np.random.default_rng(0)
    w = uniform(rng, (3, 2))
    x = uniform(rng, (4, 2 if view(w).shape[0] == 2 else 3), requires_grad=False)
    loss = (x @ view(w)).sum()
    with dt.no_grad():
        w.mul_(0.5)
    with pytest.raises(RuntimeError, match="MatMul"):
        loss.backward()


def test_update_of_a_linear_weight_raises():
    rng = np.random.default_rng(0)
    x, w, b = uniform(rng, (4, 3), requires_grad=False), uniform(rng, (2, 3)), uniform(rng, (2,))
    loss = ops.linear(x, w, b).sum()
    with dt.no_grad():
        w.sub_(1.0)
    with pytest.raises(RuntimeError, match="Linear"):
        loss.backward()


def test_update_of_a_conv_weight_raises():
    rng = np.random.default_rng(0)
    x, w = uniform(rng, (1, 2, 4, 4), requires_grad=False), uniform(rng, (3, 2, 3, 3))
    loss = ops.conv2d(x, w, padding=1).sum()
    with dt.no_grad():
        w.mul_(0.5)
    with pytest.raises(RuntimeError, match="MatMul"):
        loss.backward()


def test_in_place_change_of_the_input_of_a_1x1_conv_raises():
    # unfold of a 1x1 kernel is a view of x, and the matmul saves that view for dW
    rng = np.random.default_rng(0)
    x, w = uniform(rng, (1, 2, 3, 3), requires_grad=False), uniform(rng, (4, 2, 1, 1))
    loss = ops.conv2d(x, w).sum()
    x.mul_(2.0)  # x needs no grad: allowed in grad mode (a data loader refilling its buffer)
    with pytest.raises(RuntimeError, match="MatMul"):
        loss.backward()


def test_in_place_change_through_a_view_is_seen_by_the_base():
    x, w = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    out = (x * w).sum()
    with dt.no_grad():
        w[0:1].mul_(2.0)
    np.testing.assert_array_equal(w.numpy(), [6.0, 4.0])
    with pytest.raises(RuntimeError, match="Mul"):
        out.backward()


def test_in_place_change_through_detach_raises():
    x, w = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    out = (x * w).sum()
    w.detach().mul_(10.0)  # a detached tensor does not require grad: allowed, but shares data
    with pytest.raises(RuntimeError, match="Mul"):
        out.backward()


# ---- in-place ops refused in grad mode ----------------------------------------------------------
@pytest.mark.parametrize("name, modify", [
    ("add_", lambda t: t.add_(1.0)), ("sub_", lambda t: t.sub_(1.0)), ("mul_", lambda t: t.mul_(2.0)),
    ("div_", lambda t: t.div_(2.0)), ("zero_", lambda t: t.zero_()), ("fill_", lambda t: t.fill_(1.0)),
    ("copy_", lambda t: t.copy_(dt.tensor(np.array([1.0, 1.0])))), ("__setitem__", lambda t: t.__setitem__(0, 1.0)),
])
def test_in_place_on_a_leaf_requiring_grad_raises_in_grad_mode(name, modify):
    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match=name):
        modify(x)
    np.testing.assert_array_equal(x.numpy(), [1.0, 2.0])
    with dt.no_grad():
        modify(x)  # allowed for parameter updates


def test_in_place_on_a_graph_tensor_raises_in_grad_mode():
    h = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(RuntimeError, match="graph"):
        h.add_(1.0)


def test_in_place_on_a_tensor_without_grad_is_allowed():
    c = leaf([1.0, 2.0], requires_grad=False)
    c.add_(1.0).mul_(2.0)
    c[1] = 0.0
    np.testing.assert_array_equal(c.numpy(), [4.0, 0.0])
