"""The backward engine: deep graphs, accumulation, freeing, retain_graph, grad mode, detach,
higher-order gradients and autograd.grad."""
import gc
import sys
import weakref

import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd import grad
from autograd_testing import check, leaf, uniform


@pytest.fixture
def no_gc():
    """Reference counting alone must free the graph: no cycles left for the collector."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


# ---- deep graphs --------------------------------------------------------------------------------
DEPTH = 100_000


def test_backward_through_a_100k_node_chain(no_gc):
    assert sys.getrecursionlimit() < DEPTH  # an engine that recursed would fail here
    x = leaf([1.0, 2.0])
    y = x
    for i in range(DEPTH):
        y = y * 1.00001 if i % 2 else y + 0.5  # Mul saves its input: every node keeps state
    first = weakref.ref(y.grad_fn)
    node = y.grad_fn
    while node.next_edges[0][0].next_edges:  # walk to the op next to the leaf
        node = node.next_edges[0][0]
    bottom = weakref.ref(node)
    del node
    loss = y.sum()
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), [1.00001 ** (DEPTH // 2)] * 2, rtol=1e-9)
    del y, loss
    assert first() is None and bottom() is None  # the whole chain is freed, without gc


def test_graph_is_freed_when_outputs_are_dropped_without_backward(no_gc):
    x = leaf([1.0, 2.0])
    h = (x * 2.0).tanh()
    refs = [weakref.ref(h.grad_fn), weakref.ref(h.grad_fn.next_edges[0][0])]
    acc = weakref.ref(h.grad_fn.next_edges[0][0].next_edges[0][0])  # x's AccumulateGrad
    loss = (h * h).sum()
    del h, loss
    assert all(r() is None for r in refs) and acc() is None
    assert x.grad is None


def test_saved_tensors_are_released_after_backward():
    x = leaf([1.0, 2.0])
    y = x.exp() * x
    node = y.grad_fn
    y.sum().backward()
    assert node.saved is None and node.saved_out is None


# ---- accumulation -------------------------------------------------------------------------------
def test_tensor_feeding_several_ops_accumulates():
    x = leaf([0.5, -1.0, 2.0])
    y = x * x + x.exp() - 3.0 * x + x.tanh() * x  # x feeds 6 uses
    y.sum().backward()
    v = x.numpy()
    expected = 2 * v + np.exp(v) - 3.0 + (1 - np.tanh(v) ** 2) * v + np.tanh(v)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-14)


def test_intermediate_feeding_several_ops_diamond():
    x = leaf([0.3, 0.7])
    h = x.sigmoid()
    out = (h * 2.0 + h.exp() * h + h.tanh()).sum()
    out.backward()
    s = 1 / (1 + np.exp(-x.numpy()))
    dh = 2.0 + np.exp(s) * s + np.exp(s) + (1 - np.tanh(s) ** 2)
    np.testing.assert_allclose(x.grad.numpy(), dh * s * (1 - s), rtol=1e-14)


def test_gradient_shared_by_two_slots_is_not_changed_in_place():
    # add's backward hands the same gradient to both inputs; a later in-place accumulation into one
    # slot must not leak into the other (b's gradient is 5 + 7, not 5 + 5 + 7).
    a, b = leaf(np.ones(3)), leaf(np.ones(3))
    q = b * 7.0
    r = a * 5.0
    s = a + b
    (s * 2.0 + s * 3.0 + q + r).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [10.0] * 3)
    np.testing.assert_array_equal(b.grad.numpy(), [12.0] * 3)


def test_sum_handed_on_by_a_backward_is_not_changed_in_place():
    # s's two uses give it a sum this pass allocated; add's backward hands that very sum to u and v.
    # u's later gradient (from w) must go into a new sum, not into the one v's buffer still holds.
    x = leaf(np.ones(3))
    u, v = x * 2.0, x * 3.0
    w = u * 5.0
    s = u + v
    (s * 1.0 + s * 1.0 + w).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2 * (2 + 5) + 3 * 2] * 3)


def test_weight_reused_at_every_step_accumulates():
    w = leaf([[0.5, -0.2], [0.1, 0.3]])
    check(lambda w: dt.concat(_unroll(w, 5), axis=0), w)
    dt.concat(_unroll(w, 5), axis=0).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), grad(dt.concat(_unroll(w, 5), axis=0).sum(), w)[0].numpy(), rtol=1e-15)


def _unroll(w, steps):
    h = leaf([[1.0, 2.0]], requires_grad=False)
    out = []
    for _ in range(steps):
        h = (h @ w).tanh()
        out.append(h)
    return out


def test_leaf_grad_accumulates_across_backward_calls():
    x = leaf([1.0, 2.0])
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0 + 2.0, 3.0 + 4.0])


def test_leaf_grad_owns_its_memory():
    x, y = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    (x + y).sum().backward()  # the same broadcast, read-only gradient reaches both leaves
    with dt.no_grad():
        x.grad.mul_(10.0)
    np.testing.assert_array_equal(y.grad.numpy(), [1.0, 1.0])
    assert not np.shares_memory(x.grad.numpy(), y.grad.numpy())


def test_a_gradient_a_hook_kept_is_not_shared_with_a_leaf_grad():
    # retain_grad keeps the gradient reshape receives; reshape hands a view of it on to the leaf
    x = leaf(np.ones(4))
    t = x.reshape((2, 2))
    t.retain_grad()
    (t * 3.0).sum().backward()
    with dt.no_grad():
        x.grad.mul_(10.0)
    np.testing.assert_array_equal(t.grad.numpy(), np.full((2, 2), 3.0))
    np.testing.assert_array_equal(x.grad.numpy(), [30.0] * 4)


def test_backward_with_explicit_gradient_and_from_a_leaf():
    x = leaf([1.0, 2.0, 3.0])
    (x * 2.0).backward(dt.tensor(np.array([1.0, 0.0, -1.0])))
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 0.0, -2.0])
    s = leaf(4.0)
    s.backward()
    assert s.grad.item() == 1.0


def test_leaf_that_does_not_require_grad_gets_no_grad():
    x, c = leaf([1.0, 2.0]), leaf([3.0, 4.0], requires_grad=False)
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 4.0])


# ---- retain_graph -------------------------------------------------------------------------------
def test_second_backward_raises_and_mentions_retain_graph():
    x = leaf([1.0, 2.0])
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_retain_graph_allows_a_second_backward():
    x = leaf([1.0, 2.0])
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    first = x.grad.numpy().copy()
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * first, rtol=1e-15)


# ---- grad mode ----------------------------------------------------------------------------------
def test_no_grad_context_records_nothing():
    x = leaf([1.0])
    with dt.no_grad():
        assert not dt.is_grad_enabled()
        y = x * 2.0
    assert dt.is_grad_enabled()
    assert not y.requires_grad and y.grad_fn is None
    np.testing.assert_array_equal(y.numpy(), [2.0])


def test_no_grad_decorator_and_enable_grad_inside():
    x = leaf([1.0])

    @dt.no_grad()
    def evaluate(t):
        inner = t * 2.0
        with dt.enable_grad():
            recorded = t * 3.0
        return inner, recorded

    inner, recorded = evaluate(x)
    assert not inner.requires_grad
    assert recorded.requires_grad and recorded.grad_fn is not None
    assert dt.is_grad_enabled()

    @dt.enable_grad()
    def train_step(t):
        return t * 2.0

    with dt.no_grad():
        assert train_step(x).requires_grad


def test_set_grad_enabled_and_restore_after_exception():
    x = leaf([1.0])
    with dt.set_grad_enabled(False):
        assert not (x * 2.0).requires_grad
        with dt.set_grad_enabled(True):
            assert (x * 2.0).requires_grad
        assert not dt.is_grad_enabled()
    with pytest.raises(ZeroDivisionError):
        with dt.no_grad():
            1 / 0
    assert dt.is_grad_enabled()

    @dt.set_grad_enabled(False)
    def f(t):
        return t * 2.0

    assert not f(x).requires_grad
    assert dt.is_grad_enabled()  # decorating does not switch the mode


def test_set_grad_enabled_as_a_plain_call_switches_the_mode():
    x = leaf([1.0])
    try:
        dt.set_grad_enabled(False)
        assert not (x * 2.0).requires_grad
    finally:
        dt.set_grad_enabled(True)
    assert (x * 2.0).requires_grad


def test_requires_grad_propagates_only_from_inputs_that_require_it():
    a, c = leaf([1.0]), leaf([2.0], requires_grad=False)
    assert (a * c).requires_grad and not (c * c).requires_grad
    assert (c * c).grad_fn is None and (c * c).is_leaf


# ---- detach -------------------------------------------------------------------------------------
def test_detach_shares_data_and_blocks_gradient():
    x = leaf([1.0, 2.0])
    d = x.detach()
    assert not d.requires_grad and d.is_leaf and d.grad_fn is None
    assert np.shares_memory(d.numpy(), x.numpy())
    (x.detach() * x).sum().backward()  # only the direct path counts
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 2.0])
    with dt.no_grad():
        d.mul_(3.0)
    np.testing.assert_array_equal(x.numpy(), [3.0, 6.0])


# ---- higher order -------------------------------------------------------------------------------
def test_second_and_third_derivative_of_cube():
    x = leaf([0.5, -1.5, 2.0])
    (g,) = grad((x ** 3).sum(), [x], create_graph=True)
    np.testing.assert_allclose(g.numpy(), 3 * x.numpy() ** 2, rtol=1e-15)
    (g2,) = grad(g.sum(), [x], create_graph=True)
    np.testing.assert_allclose(g2.numpy(), 6 * x.numpy(), rtol=1e-15)
    (g3,) = grad(g2.sum(), [x])
    np.testing.assert_allclose(g3.numpy(), [6.0] * 3, rtol=1e-15)


def test_second_derivative_of_tanh_via_backward_create_graph():
    x = leaf([0.3, -0.8])
    x.tanh().sum().backward(create_graph=True)
    first = x.grad
    assert first.requires_grad
    t = np.tanh(x.numpy())
    np.testing.assert_allclose(first.numpy(), 1 - t ** 2, rtol=1e-15)
    x.grad = None
    first.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), -2 * t * (1 - t ** 2), rtol=1e-14)


def test_mixed_partial_derivative():
    x, y = leaf(1.5), leaf(-0.5)
    (gx,) = grad(x * x * y.exp(), [x], create_graph=True)
    (gxy,) = grad(gx, [y])
    np.testing.assert_allclose(gxy.item(), 2 * 1.5 * np.exp(-0.5), rtol=1e-15)


# ---- autograd.grad ------------------------------------------------------------------------------
def test_grad_returns_gradients_without_touching_dot_grad():
    x, y = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    out = (x * y).sum()
    gx, gy = grad(out, [x, y])
    np.testing.assert_array_equal(gx.numpy(), [3.0, 4.0])
    np.testing.assert_array_equal(gy.numpy(), [1.0, 2.0])
    assert x.grad is None and y.grad is None
    (gx,) = grad((x * 2.0).sum(), x)  # a single input gives a 1-tuple, as torch's
    assert gx.numpy().tolist() == [2.0, 2.0]


def test_grad_with_respect_to_an_intermediate():
    x = leaf([1.0, 2.0])
    h = x * 3.0
    (gh,) = grad((h * h).sum(), [h])
    np.testing.assert_array_equal(gh.numpy(), [6.0, 12.0])


def test_grad_allow_unused():
    x, unused = leaf([1.0]), leaf([2.0])
    out = (x * 2.0).sum()
    with pytest.raises(RuntimeError, match="allow_unused"):
        grad(out, [x, unused], retain_graph=True)
    gx, gu = grad(out, [x, unused], allow_unused=True)
    assert gu is None
    np.testing.assert_array_equal(gx.numpy(), [2.0])


def test_grad_of_input_that_does_not_require_grad_raises():
    x, c = leaf([1.0]), leaf([1.0], requires_grad=False)
    with pytest.raises(RuntimeError, match="does not require grad"):
        grad((x * c).sum(), [c])


def test_grad_with_grad_outputs_for_several_outputs():
    x = leaf([1.0, 2.0])
    a, b = x * 2.0, x * x
    (gx,) = grad([a, b], [x], [dt.tensor(np.array([1.0, 1.0])), dt.tensor(np.array([0.5, -1.0]))])
    np.testing.assert_array_equal(gx.numpy(), [2.0 + 1.0, 2.0 - 4.0])


def test_grad_mode_is_per_thread():
    import threading

    seen = {}

    def evaluate():
        with dt.no_grad():
            seen["inside"] = dt.is_grad_enabled()
            started.set()
            finish.wait(10)

    started, finish = threading.Event(), threading.Event()
    worker = threading.Thread(target=evaluate)
    worker.start()
    started.wait(10)
    x = dt.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()                       # the other thread is inside no_grad: this one still records
    finish.set()
    worker.join()
    assert seen["inside"] is False and dt.is_grad_enabled() and y.requires_grad
    fresh = threading.Thread(target=lambda: seen.setdefault("new", dt.is_grad_enabled()))
    fresh.start()
    fresh.join()
    assert seen["new"] is True                # a new thread starts with grad on


def test_grad_sum_into_adds_a_leafs_gradients_in_place_across_passes():
    w = dt.tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    x = dt.tensor(np.array([0.5, -1.0, 2.0]), requires_grad=True)
    fired = []
    w.register_post_accumulate_grad_hook(lambda t: fired.append(1))
    total = dt.zeros(3, dtype="float64")
    array = total.data
    for scale in (1.0, 2.0):   # two passes sum into one buffer; w is used twice in each (two gradients summed)
        y = ((x * w) * scale + w * w).sum()
        (gx,) = grad(y, [x], sum_into={w: total})
        np.testing.assert_array_equal(gx.numpy(), w.numpy() * scale)
    assert total.data is array and w.grad is None and fired == []
    np.testing.assert_array_equal(total.numpy(), x.numpy() * 3.0 + 2 * 2 * w.numpy())


def test_grad_sum_into_refuses_what_it_cannot_sum():
    w = dt.tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = (w * w).sum()
    h = w * 2.0
    for sums, match in [({h: dt.zeros(2, dtype="float64")}, "must be leaves"),
                        ({w: dt.zeros(3, dtype="float64")}, "must be a Tensor of that shape"),
                        ({w: dt.zeros(2)}, r"\(float64\) must be a Tensor"),
                        ({w: dt.zeros(2, dtype="float64")}, "both in inputs and in sum_into")]:
        with pytest.raises(RuntimeError, match=match):
            grad(y, [w], sum_into=sums, retain_graph=True)
    with pytest.raises(RuntimeError, match="create_graph"):
        grad(y, [h], sum_into={w: dt.zeros(2, dtype="float64")}, create_graph=True)
