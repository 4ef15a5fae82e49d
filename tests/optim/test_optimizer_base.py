"""What every optimizer shares: param groups, zero_grad, skipping, no-grad updates, version bumps."""
import numpy as np
import pytest

import disttrain as dt


def _param(shape=(3,), seed=0):
    return dt.tensor(np.random.default_rng(seed).standard_normal(shape), dtype="float64", requires_grad=True)


def _give_grad(p, value=1.0):
    p.grad = dt.tensor(np.full(p.shape, value), dtype="float64")


# ---- param groups ------------------------------------------------------------------------------
def test_tensors_become_one_group_with_the_defaults():
    a, b = _param(), _param()
    opt = dt.optim.SGD([a, b], lr=0.1, momentum=0.9)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert len(group["params"]) == 2 and group["params"][0] is a and group["params"][1] is b
    assert group["lr"] == 0.1 and group["momentum"] == 0.9 and group["nesterov"] is False


def test_dict_groups_override_defaults():
    a, b = _param(), _param()
    opt = dt.optim.Adam([{"params": [a]}, {"params": b, "lr": 0.5, "betas": (0.5, 0.6)}], lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.5]
    assert opt.param_groups[1]["betas"] == (0.5, 0.6) and opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert opt.param_groups[1]["params"][0] is b  # a lone Tensor is wrapped in a list


def test_generators_are_accepted():
    params = [_param(), _param()]
    opt = dt.optim.SGD((p for p in params), lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 2


@pytest.mark.parametrize("params,error,match", [
    (lambda: _param(), TypeError, "single Tensor"),
    (lambda: [], ValueError, "empty parameter list"),
    (lambda: [{"params": {_param()}}], TypeError, "set"),
    (lambda: [np.zeros(3)], TypeError, r"params\[0\] is a ndarray"),
    (lambda: [{"lr": 0.1}], ValueError, "no 'params'"),
])
def test_bad_params_are_explained(params, error, match):
    with pytest.raises(error, match=match):
        dt.optim.SGD(params(), lr=0.1)


def test_non_leaf_and_duplicate_parameters_are_refused():
    a = _param()
    with pytest.raises(ValueError, match="not a leaf"):
        dt.optim.SGD([a * 2.0], lr=0.1)
    with pytest.raises(ValueError, match="listed twice"):
        dt.optim.SGD([a, a], lr=0.1)
    with pytest.raises(ValueError, match="earlier param group"):
        dt.optim.SGD([{"params": [a]}, {"params": [a]}], lr=0.1)


def test_bad_hyper_parameter_in_a_later_group_is_named():
    with pytest.raises(ValueError, match="lr=-2"):
        dt.optim.SGD([{"params": [_param()]}, {"params": [_param()], "lr": -2}], lr=0.1)


# ---- zero_grad ---------------------------------------------------------------------------------
def test_zero_grad_sets_to_none_by_default():
    a, b = _param(), _param()
    opt = dt.optim.SGD([a, b], lr=0.1)
    _give_grad(a)
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_zero_grad_can_keep_the_arrays():
    a = _param()
    opt = dt.optim.SGD([a], lr=0.1)
    _give_grad(a, 3.0)
    grad = a.grad
    opt.zero_grad(set_to_none=False)
    assert a.grad is grad
    np.testing.assert_array_equal(a.grad.numpy(), np.zeros(3))


class _Reductions:
    """A stand-in for a communicator: refuses while `is_pending`, as data parallelism's hooks do."""

    def __init__(self, pending):
        self.is_pending = pending
        self.calls = []

    def refuse_zero_grad(self, opt):
        self.calls.append(("zero_grad", opt))
        if self.is_pending:
            raise RuntimeError("zero_grad() called while gradient reductions are still pending")

    def refuse_step(self, opt, args, kwargs):
        self.calls.append(("step", opt, args, kwargs))
        if self.is_pending:
            raise RuntimeError("step() called while gradient reductions are still pending")


def test_zero_grad_pre_hooks_can_refuse_and_be_removed():
    a = _param()
    opt = dt.optim.SGD([a], lr=0.1)
    _give_grad(a)
    reductions = _Reductions(pending=True)
    handle = opt.register_zero_grad_pre_hook(reductions.refuse_zero_grad)
    with pytest.raises(RuntimeError, match="reductions are still pending"):
        opt.zero_grad()
    assert a.grad is not None and reductions.calls == [("zero_grad", opt)]  # nothing was cleared
    reductions.is_pending = False
    opt.zero_grad()
    assert a.grad is None
    handle.remove()
    reductions.is_pending = True
    opt.zero_grad()                      # removed: not called again
    assert len(reductions.calls) == 2


def test_step_pre_hooks_can_refuse_or_replace_the_arguments():
    a = _param()
    before = a.numpy().copy()
    opt = dt.optim.SGD([a], lr=0.1)
    _give_grad(a)
    reductions = _Reductions(pending=True)
    handle = opt.register_step_pre_hook(reductions.refuse_step)
    with pytest.raises(RuntimeError, match="reductions are still pending"):
        opt.step()
    np.testing.assert_array_equal(a.numpy(), before)     # no update
    assert reductions.calls == [("step", opt, (None,), {})]
    handle.remove()
    closures = []
    opt.register_step_pre_hook(lambda o, args, kwargs: ((lambda: closures.append("replaced") or 2.0,), {}))
    assert opt.step() == 2.0 and closures == ["replaced"]
    np.testing.assert_allclose(a.numpy(), before - 0.1)


# ---- step --------------------------------------------------------------------------------------
def test_parameters_without_gradient_are_skipped():
    a, b = _param(seed=1), _param(seed=2)
    before = b.numpy().copy()
    opt = dt.optim.Adam([a, b], lr=0.1)
    _give_grad(a)
    opt.step()
    np.testing.assert_array_equal(b.numpy(), before)
    assert b._version == 0 and b not in opt.state and opt.state[a]["step"] == 1


def test_step_bumps_the_version_so_stale_graphs_fail_at_backward():
    a = _param()
    opt = dt.optim.SGD([a], lr=0.1)
    loss = (a * a).sum()  # Mul saves `a` for backward
    _give_grad(a)
    opt.step()
    assert a._version > 0
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_step_records_no_graph_and_runs_with_grad_mode_on():
    a = _param()
    opt = dt.optim.Adam([a], lr=0.1)
    _give_grad(a)
    assert dt.is_grad_enabled()
    opt.step()
    assert a.is_leaf and a.requires_grad and dt.is_grad_enabled()


def test_step_calls_the_closure_with_grad_enabled():
    a = _param()
    opt = dt.optim.SGD([a], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (a * a).sum()
        loss.backward()
        return loss

    with dt.no_grad():
        loss = opt.step(closure)
    assert loss.item() > 0 and a.grad is not None


def test_gradient_of_the_wrong_shape_is_refused():
    a = _param((3,))
    a.grad = dt.tensor(np.ones(1), dtype="float64")
    with pytest.raises(RuntimeError, match=r"gradient of shape \(1,\)"):
        dt.optim.SGD([a], lr=0.1).step()


def test_float32_parameters_stay_float32():
    a = dt.tensor(np.ones(4), dtype="float32", requires_grad=True)
    for opt in (dt.optim.SGD([a], lr=0.1, momentum=0.9, weight_decay=0.1), dt.optim.AdamW([a], amsgrad=True)):
        a.grad = dt.tensor(np.full(4, 0.5), dtype="float32")
        opt.step()
        opt.step()
        assert a.dtype == np.float32
        assert all(v.dtype == np.float32 for v in opt.state[a].values() if hasattr(v, "dtype"))


def test_an_optimizer_that_only_defines_update_steps_each_parameter_with_a_gradient():
    class Halve(dt.optim.Optimizer):    # the per-parameter subclass API: _update only
        def __init__(self, params):
            super().__init__(params, {})

        def _update(self, param, grad, state, group):
            param.begin_inplace("Halve.step")
            param.data -= 0.5 * grad
            state["calls"] = state.get("calls", 0) + 1

    a, b, c = _param(seed=1), _param(seed=2), _param(seed=3)
    before = [t.numpy().copy() for t in (a, b, c)]
    opt = Halve([a, b, c])
    _give_grad(a)
    _give_grad(c, 2.0)
    opt.step()
    np.testing.assert_array_equal(a.numpy(), before[0] - 0.5)
    np.testing.assert_array_equal(b.numpy(), before[1])
    np.testing.assert_array_equal(c.numpy(), before[2] - 1.0)
    assert opt.state[a] == opt.state[c] == {"calls": 1} and b not in opt.state
