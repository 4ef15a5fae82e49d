import math
import re
import warnings

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.nn.utils import clip_grad_norm_, parameters_to_vector, vector_to_parameters

try:
    import torch  # the oracle where installed
except ImportError:
    torch = None


def grads_like(seed, scale):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) * scale for s in [(4, 3), (3,), (2, 2, 2)]]


def make_params(grads):
    params = [nn.Parameter(dt.zeros(*g.shape, dtype="float64")) for g in grads]
    for p, g in zip(params, grads):
        p.grad = dt.tensor(g)
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_clip_grad_norm_matches_torch(norm_type, scale):
    torch = pytest.importorskip("torch")
    grads = grads_like(0, scale)
    ours = make_params(grads)
    theirs = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for t, g in zip(theirs, grads):
        t.grad = torch.from_numpy(g.copy())
    total = clip_grad_norm_(ours, 1.0, norm_type)
    total_t = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert isinstance(total, float)
    assert total == pytest.approx(total_t.item(), rel=1e-12)
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.grad.numpy(), t.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clipping_parts_by_the_norm_of_the_whole(norm_type):
    """Gradients split in two parts (two processes' slices), each clipped with total_norm= the norm of both:
    the same numbers as clipping them all together; a part without gradients returns the total too."""
    grads = grads_like(1, 3.0)
    whole = make_params(grads)
    first, second = make_params(grads[:1]), make_params(grads[1:])
    total = clip_grad_norm_(whole, 1.0, norm_type)
    assert clip_grad_norm_(first, 1.0, norm_type, total_norm=total) == total
    assert clip_grad_norm_(second, 1.0, norm_type, total_norm=total) == total
    assert clip_grad_norm_([nn.Parameter(dt.zeros(2))], 1.0, norm_type, total_norm=total) == total
    for a, b in zip(whole, first + second):
        np.testing.assert_array_equal(a.grad.numpy(), b.grad.numpy())
    with pytest.raises(RuntimeError, match="the total norm of order 2.0 of the gradients is nan"):
        clip_grad_norm_(first, 1.0, error_if_nonfinite=True, total_norm=math.nan)


# torch 2.13's results for the gradients [1, 0, 3], [5, 5], [0, 0] clipped to 1.0: the norm of the per-gradient
# norms, so order 0 counts the gradients with a nonzero element (2), and a negative order or -inf meets a zero
EDGE_GRADS = [[1.0, 0.0, 3.0], [5.0, 5.0], [0.0, 0.0]]
EDGE_TOTALS = {0: 2.0, -1: 0.0, -2.5: 0.0, -math.inf: 0.0, "2": 60 ** 0.5, True: 14.0, math.nan: math.nan}


@pytest.mark.parametrize("norm_type", list(EDGE_TOTALS), ids=repr)
def test_clip_grad_norm_orders_zero_negative_and_odd_spellings_as_torch(norm_type):
    params = make_params([np.array(g) for g in EDGE_GRADS])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero warning on the way
        total = clip_grad_norm_(params, 1.0, norm_type)
    expected = EDGE_TOTALS[norm_type]
    np.testing.assert_allclose(total, expected, rtol=1e-15)
    coef = min(1.0, 1.0 / (expected + 1e-6))
    for p, g in zip(params, EDGE_GRADS):
        np.testing.assert_allclose(p.grad.numpy(), np.array(g) * (coef if not math.isnan(expected) else math.nan),
                                   rtol=1e-15)
    if torch is not None:
        theirs = [torch.zeros(len(g), dtype=torch.float64, requires_grad=True) for g in EDGE_GRADS]
        for t, g in zip(theirs, EDGE_GRADS):
            t.grad = torch.tensor(g, dtype=torch.float64)
        np.testing.assert_allclose(total, torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type).item(),
                                   rtol=1e-15)
        for p, t in zip(params, theirs):
            np.testing.assert_allclose(p.grad.numpy(), t.grad.numpy(), rtol=1e-15)


def test_clip_grad_norm_negative_order_without_zeros():
    params = make_params([np.array([1.0, 2.0]), np.array([4.0])])
    assert clip_grad_norm_(params, 1.0, -1) == pytest.approx(1 / (1 + 1 / 2 + 1 / 4), rel=1e-15)


@pytest.mark.parametrize("norm_type", ["fro", None, [2.0]], ids=repr)
def test_clip_grad_norm_refuses_what_is_not_a_number_in_one_line(norm_type):
    params = make_params([np.array(g) for g in EDGE_GRADS])
    with pytest.raises(ValueError, match=rf"^clip_grad_norm_: norm_type={re.escape(repr(norm_type))} is not a "
                                         r"number; [^\n]*$"):
        clip_grad_norm_(params, 1.0, norm_type)
    if torch is not None:
        with pytest.raises((TypeError, ValueError)):  # torch refuses them too
            torch.nn.utils.clip_grad_norm_([torch.zeros(1, requires_grad=True)], 1.0, norm_type)


def test_clip_grad_norm_scales_in_place_and_skips_missing_grads():
    params = make_params(grads_like(1, 5.0))
    arrays = [p.grad.data for p in params]
    params.append(nn.Parameter(dt.zeros(2)))
    total = clip_grad_norm_(params, 0.5)
    assert total > 0.5
    assert all(p.grad.data is a for p, a in zip(params, arrays))
    new_norm = math.sqrt(sum(float((p.grad.numpy() ** 2).sum()) for p in params[:3]))
    assert new_norm == pytest.approx(0.5, rel=1e-5)
    assert clip_grad_norm_([nn.Parameter(dt.zeros(2))], 1.0) == 0.0


def test_clip_grad_norm_on_gradients_from_backward():
    # add hands both leaves the same (broadcast, read-only) gradient array; clipping must scale each once
    a, b = nn.Parameter(dt.zeros(3)), nn.Parameter(dt.zeros(3))
    ((a + b) * 4.0).sum().backward()
    total = clip_grad_norm_([a, b], 1.0)
    assert total == pytest.approx(math.sqrt(6 * 16))
    expected = 4.0 / (total + 1e-6)
    np.testing.assert_allclose(a.grad.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(b.grad.numpy(), expected, rtol=1e-6)


def test_error_if_nonfinite():
    params = make_params([np.array([np.inf, 1.0])])
    with pytest.raises(RuntimeError, match="inf"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


def test_parameters_vector_round_trip():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    vec = parameters_to_vector(model.parameters())
    assert vec.shape == (3 * 2 + 2 + 2 + 1,)
    vector_to_parameters(vec * 2.0, model.parameters())
    np.testing.assert_allclose(parameters_to_vector(model.parameters()).numpy(), vec.numpy() * 2.0)
    with pytest.raises(ValueError, match="11 elements"):
        vector_to_parameters(dt.zeros(4), model.parameters())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_clipping_takes_all_gradients_in_one_norms_and_one_scale_call(kernel_calls, dtype):
    called = kernel_calls("norms", "scale_")
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(s).astype(dtype) for s in [(300, 301), (7,), (0,), (65537,), (3, 5)]]
    params = [nn.Parameter(dt.zeros(*g.shape, dtype=dtype)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = dt.tensor(g.copy(), dtype=dtype)
    total = clip_grad_norm_(params, 1.0)
    assert called == ["norms", "scale_"]
    exact = math.sqrt(math.fsum((np.concatenate([g.ravel() for g in grads]).astype(np.float64) ** 2).tolist()))
    assert total == pytest.approx(exact, rel=1e-12)     # float64 sums of squares, whatever the dtype
    coef = 1.0 / (total + 1e-6)
    for p, g in zip(params, grads):
        np.testing.assert_array_equal(p.grad.numpy(), g * g.dtype.type(coef))  # the reference's g *= coef
        assert p.grad._version == 1
