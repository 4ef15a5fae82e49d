"""Optimizer save / resume: 5 steps, save, fresh optimizer, load, 5 more == 10 straight (bitwise)."""
import numpy as np
import pytest

import disttrain as dt

SHAPES = [(3, 2), (4,)]
CONFIGS = [
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.5, dampening=0.2)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, betas=(0.8, 0.99))),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CONFIGS)]


def _params(values):
    return [dt.tensor(v, dtype="float64", requires_grad=True) for v in values]


def _make(name, kwargs, params):
    # two groups, the second with its own lr, so indices run across groups
    return getattr(dt.optim, name)([{"params": params[:1]}, {"params": params[1:], "lr": 0.03}], **kwargs)


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = dt.tensor(g, dtype="float64")
        opt.step()


def _setup(seed=0, steps=10):
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(s) for s in SHAPES]
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(steps)]
    return values, grads


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_resume_is_bitwise_identical(name, kwargs):
    values, grads = _setup()
    straight = _params(values)
    _run(_make(name, kwargs, straight), straight, grads)

    first = _params(values)
    opt = _make(name, kwargs, first)
    _run(opt, first, grads[:5])
    saved = opt.state_dict()
    resumed = _params([p.numpy() for p in first])  # a fresh process: new tensors, new optimizer
    opt2 = _make(name, kwargs, resumed)
    opt2.load_state_dict(saved)
    _run(opt2, resumed, grads[5:])
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_layout_is_torchs_with_numpy_buffers_and_plain_numbers():
    values, grads = _setup()
    params = _params(values)
    opt = _make("Adam", dict(lr=0.01, amsgrad=True), params)
    _run(opt, params, grads[:2])
    sd = opt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1]]
    assert [g["lr"] for g in sd["param_groups"]] == [0.01, 0.03]
    assert sd["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(sd["state"]) == {0, 1}
    entry = sd["state"][1]
    assert type(entry["step"]) is int and entry["step"] == 2
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert isinstance(entry[key], np.ndarray) and entry[key].shape == (4,)


def test_state_dict_is_a_snapshot():
    values, grads = _setup()
    params = _params(values)
    opt = _make("SGD", dict(lr=0.1, momentum=0.9), params)
    _run(opt, params, grads[:2])
    sd = opt.state_dict()
    buf = sd["state"][0]["momentum_buffer"].copy()
    _run(opt, params, grads[2:4])
    opt.param_groups[0]["lr"] = 99.0
    np.testing.assert_array_equal(sd["state"][0]["momentum_buffer"], buf)
    assert sd["param_groups"][0]["lr"] == 0.1


def test_loaded_buffers_are_copies_cast_to_the_parameter_dtype():
    values, grads = _setup()
    params = _params(values)
    opt = _make("SGD", dict(lr=0.1, momentum=0.9), params)
    _run(opt, params, grads[:2])
    sd = opt.state_dict()
    single = [dt.tensor(v, dtype="float32", requires_grad=True) for v in values]
    opt32 = _make("SGD", dict(lr=0.1, momentum=0.9), single)
    opt32.load_state_dict(sd)
    buf = opt32.state[single[0]]["momentum_buffer"]
    assert buf.dtype == np.float32
    assert not np.shares_memory(buf, sd["state"][0]["momentum_buffer"])


def test_only_parameters_with_state_are_saved():
    values, _ = _setup()
    params = _params(values)
    opt = _make("SGD", dict(lr=0.1, momentum=0.9), params)
    params[1].grad = dt.tensor(np.ones(4), dtype="float64")
    opt.step()
    assert set(opt.state_dict()["state"]) == {1}


def _saved_adam():
    values, grads = _setup()
    params = _params(values)
    opt = _make("Adam", dict(lr=0.01), params)
    _run(opt, params, grads[:1])
    return opt.state_dict(), values


def test_wrong_group_count_is_named():
    sd, values = _saved_adam()
    opt = dt.optim.Adam(_params(values), lr=0.01)
    with pytest.raises(ValueError, match="2 param groups, this optimizer has 1"):
        opt.load_state_dict(sd)


def test_wrong_group_size_is_named():
    sd, values = _saved_adam()
    params = _params(values) + _params(values[1:])
    opt = dt.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.01)
    with pytest.raises(ValueError, match="param group 1: loaded state dict has 1 parameters, .* has 2"):
        opt.load_state_dict(sd)


def test_wrong_buffer_shape_is_named_and_nothing_changes():
    sd, values = _saved_adam()
    params = _params([values[0], np.zeros(5)])
    opt = _make("Adam", dict(lr=0.5), params)
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 1 has shape \(4,\), .* shape \(5,\)"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5 and not opt.state


def test_state_of_another_optimizer_kind_is_refused():
    sd, values = _saved_adam()
    opt = _make("SGD", dict(lr=0.1), _params(values))
    with pytest.raises(ValueError, match=r"lacks hyper-parameters \['dampening', 'momentum', 'nesterov'\]"):
        opt.load_state_dict(sd)
