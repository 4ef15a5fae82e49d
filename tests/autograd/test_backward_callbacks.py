"""End-of-backward callbacks (disttrain.autograd.queue_callback): when they run, how often, on errors."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd import queue_callback
from autograd_testing import leaf


def test_a_callback_runs_once_after_every_grad_ready_hook_and_before_backward_returns():
    a, b = leaf([1.0, 2.0]), leaf([3.0])
    events = []

    def ready(t):
        events.append(("ready", t.shape))
        queue_callback(lambda: events.append(("end", a.grad.numpy().tolist(), b.grad.numpy().tolist())))

    a.register_post_accumulate_grad_hook(ready)
    b.register_post_accumulate_grad_hook(ready)
    (a * b).sum().backward()
    events.append("returned")
    assert sorted(events[:2]) == [("ready", (1,)), ("ready", (2,))]
    # two hooks queued one callback each: both run after both hooks, with the final gradients
    assert events[2:] == [("end", [3.0, 3.0], [3.0]), ("end", [3.0, 3.0], [3.0]), "returned"]


def test_callbacks_run_in_order_and_may_queue_more_in_the_same_round():
    x = leaf([1.0])
    order = []

    def hook(t):
        queue_callback(lambda: order.append(1))
        queue_callback(lambda: (order.append(2), queue_callback(lambda: order.append(3))))

    x.register_post_accumulate_grad_hook(hook)
    (x * 2.0).sum().backward()
    assert order == [1, 2, 3]


def test_each_pass_has_its_own_queue_with_retain_graph():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    runs = []
    first = [True]

    def hook(t):
        if first[0]:  # only the first pass queues: the second must not replay it
            queue_callback(lambda: runs.append(x.grad.numpy().tolist()))
            first[0] = False

    x.register_post_accumulate_grad_hook(hook)
    y.backward(retain_graph=True)
    y.backward()
    assert runs == [[2.0, 4.0]]
    np.testing.assert_array_equal(x.grad.numpy(), [4.0, 8.0])


def test_grad_runs_the_callbacks_of_its_pass_too():
    x = leaf([2.0])
    h = x * 3.0
    runs = []
    h.register_hook(lambda g: queue_callback(lambda: runs.append(g.item())))
    (gx,) = dt.grad((h * h).sum(), [x])
    assert runs == [12.0] and gx.item() == 36.0


def test_a_pass_that_raises_drops_its_callbacks_and_the_next_pass_starts_empty():
    x = leaf([1.0])
    runs = []

    def hook(g):
        queue_callback(lambda: runs.append("callback"))
        raise RuntimeError("hook failed")

    handle = x.register_hook(hook)
    with pytest.raises(RuntimeError, match="hook failed"):
        (x * 2.0).sum().backward()
    handle.remove()
    (x * 2.0).sum().backward()
    assert runs == []


def test_a_failing_callback_stops_the_rest_and_reaches_the_caller():
    x = leaf([1.0])
    runs = []

    def hook(t):
        queue_callback(lambda: 1 / 0)
        queue_callback(lambda: runs.append("later"))

    x.register_post_accumulate_grad_hook(hook)
    with pytest.raises(ZeroDivisionError):
        (x * 2.0).sum().backward()
    assert runs == [] and x.grad.item() == 2.0


def test_queueing_outside_backward_is_an_error():
    with pytest.raises(RuntimeError, match="no backward pass is running"):
        queue_callback(lambda: None)


def test_a_pass_inside_a_pass_runs_its_callbacks_when_it_ends():
    """grad() called during an outer backward (what a checkpoint's backward does) owns its own callbacks."""
    x, w = leaf([1.0, 2.0]), leaf([0.5, 0.5])
    order = []
    inner_x = leaf([3.0])

    def outer_hook(g):
        queue_callback(lambda: order.append("outer end"))
        with dt.enable_grad():  # backward runs hooks with grad mode off
            inner_h = inner_x * 2.0
            inner_h.register_hook(lambda g: queue_callback(lambda: order.append("inner end")))
            dt.grad(inner_h.sum(), [inner_x])
        order.append("inner returned")
        return g

    y = x * w
    y.register_hook(outer_hook)
    y.sum().backward()
    assert order == ["inner end", "inner returned", "outer end"]
