"""Op observers (disttrain.autograd.observe): what they are told, nesting depth, removal, threads."""
import threading

import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd import OpCall, add_op_observer, observe, observe_ops
from disttrain.autograd.function import Function
from disttrain.autograd.ops import unbind
from disttrain.tensor.tensor import Tensor
from autograd_testing import leaf


class ExpOfTanh(Function):
    """An op whose forward applies other ops (as a checkpointed call's first run does)."""

    def forward(self, x):
        return Tensor._wrap(x).tanh().exp().data

    def backward(self, g):
        raise NotImplementedError


def test_an_observer_is_told_op_node_inputs_outputs_times_and_depth():
    x = leaf([[1.0, -2.0], [0.5, 3.0]])
    calls = []
    with observe_ops(calls.append):
        y = x * 2.0
        z = y.sum(axis=0)
        with dt.no_grad():
            w = x.exp()
    assert [c.op.__name__ for c in calls] == ["Mul", "Sum", "Exp"]
    mul, total, exp = calls
    assert all(isinstance(c, OpCall) and c.depth == 0 and c.stop >= c.start for c in calls)
    assert mul.node is y.grad_fn and total.node is z.grad_fn and exp.node is None  # nothing recorded
    assert mul.inputs == (x, 2.0) and mul.outputs == (y,) and exp.outputs == (w,)
    with observe_ops(calls.append):
        rows = unbind(x, 0)
    assert calls[-1].op.__name__ == "Unbind" and calls[-1].outputs == rows and len(rows) == 2  # every output


def test_ops_inside_another_ops_forward_are_observed_one_level_deeper():
    x = leaf([0.5, -1.0])
    calls = []
    with observe_ops(calls.append):
        out = ExpOfTanh.apply(x)
    assert [(c.op.__name__, c.depth) for c in calls] == [("Tanh", 1), ("Exp", 1), ("ExpOfTanh", 0)]
    np.testing.assert_allclose(out.numpy(), np.exp(np.tanh(x.numpy())), rtol=1e-15)
    assert calls[-1].start <= calls[0].start and calls[1].stop <= calls[-1].stop


def test_removal_restores_the_plain_path_and_leaves_function_apply_alone():
    original = Function.__dict__["apply"]
    seen_a, seen_b = [], []
    handle_a = add_op_observer(lambda c: seen_a.append(c.op.__name__))
    try:
        with observe_ops(lambda c: seen_b.append(c.op.__name__)):
            dt.ones(2).exp()
        dt.ones(2).tanh()
        assert observe.state.active  # a remains
    finally:
        handle_a.remove()
        handle_a.remove()  # twice is harmless
    dt.ones(2).sigmoid()
    assert seen_a == ["Exp", "Tanh"] and seen_b == ["Exp"]
    assert not observe.state.active and Function.__dict__["apply"] is original


def test_an_error_in_the_block_or_in_an_op_removes_the_observer_and_the_next_op_is_observed():
    seen = []
    with pytest.raises(RuntimeError, match="stop"):
        with observe_ops(lambda c: seen.append(c.op.__name__)):
            raise RuntimeError("stop")
    assert not observe.state.active
    with observe_ops(lambda c: seen.append((c.op.__name__, c.depth))):
        with pytest.raises(dt.autograd.OpError):
            dt.ones(2, 3) @ dt.ones(2, 3)  # forward raises: no call reported, the bypass token is gone
        dt.ones(2).exp()
    assert seen == [("Exp", 0)]


def test_an_observer_error_reaches_the_op_caller():
    def fail(call):
        raise ValueError(f"observer saw {call.op.__name__}")

    with observe_ops(fail), pytest.raises(ValueError, match="observer saw Exp"):
        dt.ones(2).exp()


def test_other_threads_ops_are_observed_at_their_own_depth():
    calls, lock = [], threading.Lock()

    def record(call):
        with lock:
            calls.append((threading.current_thread().name, call.op.__name__, call.depth))

    with observe_ops(record):
        worker = threading.Thread(target=lambda: dt.ones(2).exp(), name="worker")
        worker.start()
        worker.join()
    assert calls == [("worker", "Exp", 0)]


def test_an_observer_must_be_callable():
    with pytest.raises(TypeError, match="callable"):
        add_op_observer("print")
