"""Tensor hooks, retain_grad, and post-accumulate-grad hooks (the data-parallel overlap property)."""
import numpy as np
import pytest

import disttrain as dt
from autograd_testing import leaf, uniform

try:
    import torch  # the oracle where installed
except ImportError:
    torch = None


# ---- register_hook ------------------------------------------------------------------------------
def test_hook_on_leaf_sees_and_replaces_the_gradient():
    x = leaf([1.0, 2.0])
    seen = []
    x.register_hook(lambda g: seen.append(g.numpy().copy()))      # returns None: gradient unchanged
    x.register_hook(lambda g: g * 10.0)                           # replaces it
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(seen[0], [3.0, 3.0])
    np.testing.assert_array_equal(x.grad.numpy(), [30.0, 30.0])


def test_hook_on_leaf_runs_once_with_the_summed_gradient():
    x = leaf([1.0])
    calls = []
    x.register_hook(lambda g: calls.append(g.item()))
    (x * 2.0 + x * 3.0 + x.exp()).sum().backward()
    assert calls == [pytest.approx(5.0 + np.e, rel=1e-15)]


def test_hook_on_non_leaf_changes_what_flows_upstream():
    x = leaf([1.0, 2.0])
    h = x * 2.0
    seen = []

    def hook(g):
        seen.append(g.numpy().copy())
        return g * 0.5

    h.register_hook(hook)
    (h * h + h).sum().backward()  # h feeds two ops: one call, with the sum
    np.testing.assert_array_equal(seen[0], 2 * h.numpy() + 1)
    np.testing.assert_array_equal(x.grad.numpy(), (2 * h.numpy() + 1) * 0.5 * 2.0)
    assert h.grad is None  # a hook does not retain the gradient


def test_handle_remove():
    x = leaf([1.0])
    handle = x.register_hook(lambda g: g * 100.0)
    h = x * 1.0
    h_handle = h.register_hook(lambda g: g * 7.0)
    handle.remove()
    h_handle.remove()
    handle.remove()  # removing twice is harmless
    (h * 2.0).sum().backward()
    assert x.grad.item() == 2.0


def test_hook_needs_a_tensor_that_requires_grad():
    with pytest.raises(RuntimeError, match="does not require grad"):
        leaf([1.0], requires_grad=False).register_hook(lambda g: g)


# ---- retain_grad --------------------------------------------------------------------------------
def test_retain_grad_on_non_leaf():
    x = leaf([1.0, 2.0])
    h = x * 3.0
    k = h * 2.0
    h.retain_grad()
    (k * k).sum().backward()
    np.testing.assert_array_equal(h.grad.numpy(), 2 * k.numpy() * 2.0)
    assert k.grad is None
    assert not h.grad.requires_grad


def test_retain_grad_twice_stores_the_gradient_once():
    x = leaf([1.0, 2.0])
    h = x * 3.0
    h.retain_grad()
    h.retain_grad()
    h.sum().backward()
    np.testing.assert_array_equal(h.grad.numpy(), [1.0, 1.0])


@pytest.mark.parametrize("retain_first", [True, False])
def test_retain_grad_stores_what_the_other_hooks_pass_on_whatever_the_order(retain_first):
    """As torch's: retain_grad's store runs after the tensor's other hooks, so .grad is the hooked gradient."""
    results = []
    for lib in [dt] + ([torch] if torch is not None else []):
        x = lib.tensor([1.0, 2.0], dtype=lib.float64, requires_grad=True)
        h = x * 3.0
        if retain_first:
            h.retain_grad()
        h.register_hook(lambda g: g * 2.0)
        h.register_hook(lambda g: g + 1.0)
        if not retain_first:
            h.retain_grad()
        (h * h).sum().backward()
        results.append((np.asarray(h.grad.tolist()), np.asarray(x.grad.tolist())))
    for h_grad, x_grad in results:  # (2 h) * 2 + 1 stored and sent on, times 3 into x
        np.testing.assert_array_equal(h_grad, [13.0, 25.0])
        np.testing.assert_array_equal(x_grad, [39.0, 75.0])


def test_retain_grad_on_leaf_is_a_no_op():
    x = leaf([1.0])
    x.retain_grad()
    (x * 2.0).sum().backward()
    assert x.grad.item() == 2.0


def test_retain_grad_on_the_root():
    x = leaf([1.0, 2.0])
    loss = (x * x).sum()
    loss.retain_grad()
    loss.backward()
    assert loss.grad.item() == 1.0


# ---- post-accumulate-grad hooks -----------------------------------------------------------------
def test_post_accumulate_hook_fires_once_per_pass_with_the_final_gradient():
    p = leaf([1.0, 2.0])
    calls = []
    p.register_post_accumulate_grad_hook(lambda t: calls.append(t.grad.numpy().copy()))
    loss = (p * 2.0).sum() + (p * p).sum() + p.exp().sum()  # p feeds three ops
    loss.backward()
    final = 2.0 + 2 * p.numpy() + np.exp(p.numpy())
    assert len(calls) == 1
    np.testing.assert_allclose(calls[0], final, rtol=1e-15)
    (p * 2.0).sum().backward()
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], final + 2.0, rtol=1e-15)  # .grad accumulated before the hook


def test_post_accumulate_hook_with_a_tied_parameter():
    w = leaf([[0.5, 0.1], [-0.3, 0.2]])
    calls = []
    w.register_post_accumulate_grad_hook(lambda t: calls.append(t.grad.numpy().copy()))
    x = leaf([[1.0, 2.0]], requires_grad=False)
    out = ((x @ w).tanh() @ w.T).sum()  # w used by the first and the last layer
    out.backward()
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], w.grad.numpy())
    np.testing.assert_allclose(calls[0], dt.autograd.grad(((x @ w).tanh() @ w.T).sum(), w)[0].numpy(), rtol=1e-15)


def test_post_accumulate_hook_handle_remove_and_leaf_only():
    p = leaf([1.0])
    calls = []
    handle = p.register_post_accumulate_grad_hook(lambda t: calls.append(1))
    handle.remove()
    (p * 2.0).sum().backward()
    assert calls == []
    with pytest.raises(RuntimeError, match="leaf"):
        (p * 2.0).register_post_accumulate_grad_hook(lambda t: None)


def test_post_accumulate_hook_not_fired_by_autograd_grad():
    p = leaf([1.0])
    calls = []
    p.register_post_accumulate_grad_hook(lambda t: calls.append(1))
    dt.autograd.grad((p * 2.0).sum(), [p])
    assert calls == [] and p.grad is None


def test_in_place_change_of_grad_in_a_post_accumulate_hook_does_not_leak_into_backward():
    """A data-parallel hook averages .grad in place while backward goes on; the gradient still
    flowing to other nodes must be unaffected (add hands the same array to both inputs)."""
    x, w = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    w.register_post_accumulate_grad_hook(lambda p: p.grad.mul_(0.5))
    h = x * 2.0
    ((h + w) * 3.0).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [1.5, 1.5])
    np.testing.assert_array_equal(x.grad.numpy(), [6.0, 6.0])
    # the same through a view: reshape's backward passes on a view of the gradient it receives
    x2, w2 = leaf(np.ones((2, 2))), leaf(np.ones(4))
    w2.register_post_accumulate_grad_hook(lambda p: p.grad.zero_())
    ((x2 * 2.0 + w2.reshape((2, 2))) * 3.0).sum().backward()
    np.testing.assert_array_equal(x2.grad.numpy(), np.full((2, 2), 6.0))


def test_parameters_of_the_last_layer_are_ready_before_backward_reaches_the_first_layer():
    """The overlap property data parallelism relies on: a gradient can be all-reduced while
    backward is still running through earlier layers."""
    rng = np.random.default_rng(0)
    sizes = [4, 5, 5, 3]
    params = []
    for i in range(3):
        params.append((f"W{i}", uniform(rng, (sizes[i], sizes[i + 1]))))
        params.append((f"b{i}", uniform(rng, (sizes[i + 1],))))
    events = []
    for name, p in params:
        p.register_post_accumulate_grad_hook(lambda t, name=name: events.append(("ready", name, t.grad.numpy().copy())))
    x = uniform(rng, (2, 4), requires_grad=False)
    h = x
    for i in range(3):
        h = h @ params[2 * i][1] + params[2 * i + 1][1]
        if i == 0:
            first_activation = h
            first_activation.register_hook(lambda g: events.append(("reached layer 0", None, None)))
        if i < 2:
            h = h.tanh()
    h.sum().backward()
    order = [name if kind == "ready" else kind for kind, name, _ in events]
    reached = order.index("reached layer 0")
    assert {"W2", "b2", "W1", "b1"} <= set(order[:reached])
    assert set(order[reached + 1:]) == {"W0", "b0"}
    assert len(order) == 7  # every parameter once
    for kind, name, g in events:  # each hook saw its final gradient
        if kind == "ready":
            np.testing.assert_array_equal(g, dict(params)[name].grad.numpy())
