"""The compiled multi-tensor kernels (norms, scale_, foreach_sgd_step of disttrain.kernels_cpu.wrappers) against
the NumPy reference.

Scaling and the SGD update do the reference's operations in the same order with no fused multiply-adds, so
they must be bitwise equal, in float32 and float64, whatever the thread count. The L2 norms sum the squares in
float64 (the reference sums float32 arrays in float32): they are compared with the exact sum (math.fsum of the
float64 squares) to 1e-12 relative, and must be at least as close to it as the reference's, and bitwise the
same on 1 and 2 threads.
"""
import itertools
import math

import numpy as np
import pytest

from disttrain.kernels_cpu import native, wrappers
from disttrain.tensor import kernels_numpy, threads

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason=f"compiled CPU kernels unavailable: {native.unavailable_reason()}")

DTYPES = [np.float32, np.float64]
# odd sizes leave vector tails; empty arrays cover no elements; the 300 x 2001 one is cut over two threads
# and over several sum-of-squares chunks, one of which ends inside it
SHAPES = [(300, 2001), (0,), (7,), (65537,), (3, 5), (1,), (0, 4), (1000, 33)]


def _arrays(dtype, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _many_shapes(count=200, seed=1):
    return [tuple(s) for s in np.random.default_rng(seed).integers(0, 40, size=(count, 2))]


def _with_threads(n, fn):
    before = threads.get_num_threads()
    threads.set_num_threads(n)
    try:
        return fn()
    finally:
        threads.set_num_threads(before)


def _assert_lists_equal(got, expected):
    assert len(got) == len(expected)
    for k, (g, e) in enumerate(zip(got, expected)):
        if e is None:
            assert g is None, k
        else:
            assert g.dtype == e.dtype and g.shape == e.shape, k
            np.testing.assert_array_equal(g, e, err_msg=f"array {k}")


def _assert_compiled_is_the_reference(run, kernel, *args):
    """run(the compiled `kernel`, *args) and run(the reference's, *args) return equal lists of arrays."""
    got, expected = run(getattr(wrappers, kernel), *args), run(getattr(kernels_numpy, kernel), *args)
    for got_list, expected_list in zip(got, expected):
        _assert_lists_equal(got_list, expected_list)


def _exact_norms(arrays):
    return np.array([math.sqrt(math.fsum((a.astype(np.float64).ravel() ** 2).tolist())) for a in arrays])


# ---- L2 norms ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [SHAPES, _many_shapes()], ids=["odd-sizes", "200-arrays"])
def test_l2_norms_are_as_accurate_as_the_reference(num_threads, dtype, shapes):
    arrays = _arrays(dtype, shapes)
    exact = _exact_norms(arrays)
    got = wrappers.norms(np, arrays, 2.0)
    assert got.dtype == np.float64 and got.shape == (len(arrays),)
    np.testing.assert_allclose(got, exact, rtol=1e-12, atol=0)
    reference_error = np.abs(kernels_numpy.norms(np, arrays, 2.0).astype(np.float64) - exact)
    assert np.all(np.abs(got - exact) <= reference_error + 1e-12 * exact)


def test_norms_of_other_orders_and_of_no_arrays_are_the_references():
    arrays = [a for a in _arrays(np.float32) if a.size]  # the reference's max |x| has none for an empty array
    for p in (1.0, 3.0, math.inf):
        np.testing.assert_array_equal(wrappers.norms(np, arrays, p), kernels_numpy.norms(np, arrays, p))
    assert wrappers.norms(np, [], 2.0).shape == kernels_numpy.norms(np, [], 2.0).shape == (0,)


def test_norms_take_any_layout():
    a = _arrays(np.float64)[0]
    np.testing.assert_allclose(wrappers.norms(np, [a.T, a[:, ::3]], 2.0), _exact_norms([a, a[:, ::3]]), rtol=1e-12)


# ---- scaling ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [SHAPES, _many_shapes()], ids=["odd-sizes", "200-arrays"])
def test_scale_is_bitwise_the_references(num_threads, dtype, shapes):
    got, expected = _arrays(dtype, shapes), _arrays(dtype, shapes)
    wrappers.scale_(np, got, 0.37)
    kernels_numpy.scale_(np, expected, 0.37)
    _assert_lists_equal(got, expected)


def test_scale_of_views_and_of_no_arrays():
    base = _arrays(np.float32)[0]
    got, expected = base.copy(), base.copy()
    wrappers.scale_(np, [got[:, ::2], got[:3]], 0.5)  # a strided view: the reference's own pass
    kernels_numpy.scale_(np, [expected[:, ::2], expected[:3]], 0.5)
    np.testing.assert_array_equal(got, expected)
    wrappers.scale_(np, [], 0.5)
    read_only = base.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        wrappers.scale_(np, [base.copy(), read_only], 0.5)


# ---- the SGD update -----------------------------------------------------------------------------------------

SGD_OPTIONS = [dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
               for m, d, wd, n, mx in itertools.product((0.0, 0.9), (0.0, 0.3), (0.0, 0.01), (False, True),
                                                       (False, True))
               if not (n and (m == 0 or d != 0))]  # nesterov needs momentum and no dampening, as SGD checks


def _sgd_two_steps(step, dtype, options, lr, shapes=SHAPES):
    """Two steps of `step` (a foreach_sgd_step) from fresh buffers: (params, buffers after each step, grads)."""
    params, grads = _arrays(dtype, shapes, seed=2), _arrays(dtype, shapes, seed=3)
    first = step(np, params, grads, [None] * len(params), lr, **options)
    first_copies = [None if b is None else b.copy() for b in first]
    second = step(np, params, grads, first, lr, **options)
    return params, first_copies, second, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lr", [0.1, 1.0])
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sgd_is_bitwise_the_references(dtype, lr, options):
    _assert_compiled_is_the_reference(_sgd_two_steps, "foreach_sgd_step", dtype, options, lr)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_on_many_arrays_is_bitwise_the_references(num_threads, dtype):
    options = dict(momentum=0.9, weight_decay=0.01, nesterov=True)
    _assert_compiled_is_the_reference(_sgd_two_steps, "foreach_sgd_step", dtype, options, 0.1, _many_shapes())


def test_first_step_buffers_are_new_arrays_and_grads_stay():
    params, grads = _arrays(np.float32, seed=2), _arrays(np.float32, seed=3)
    grads_before = [g.copy() for g in grads]
    old = np.full(params[2].shape, 0.5, np.float32)   # one parameter already has a buffer: a later step for it
    buffers = [None, None, old] + [None] * (len(params) - 3)
    expected_params = [p.copy() for p in params]
    expected = kernels_numpy.foreach_sgd_step(np, expected_params, grads, [None, None, old.copy()] + buffers[3:],
                                              0.1, momentum=0.9, dampening=0.2)
    got = wrappers.foreach_sgd_step(np, params, grads, buffers, 0.1, momentum=0.9, dampening=0.2)
    _assert_lists_equal(got, expected)
    _assert_lists_equal(params, expected_params)
    assert got[2] is old and all(b is not g for b, g in zip(got, grads))
    _assert_lists_equal(grads, grads_before)


def test_sgd_without_momentum_returns_the_buffers_as_given():
    params, grads = _arrays(np.float64)[:3], _arrays(np.float64, seed=1)[:3]
    kept = np.ones_like(params[1])   # left from an earlier run with momentum: sgd_step returns it untouched
    got = wrappers.foreach_sgd_step(np, params, grads, [None, kept, None], 0.1)
    assert got[0] is None and got[1] is kept and got[2] is None
    np.testing.assert_array_equal(kept, 1.0)


def test_sgd_falls_back_to_the_reference_where_the_kernel_does_not_apply():
    grads = _arrays(np.float32, seed=3)
    cases = {"transposed (non-contiguous) parameters": (np.float32, [g.T for g in grads]),
             "float64 parameters, float32 gradients": (np.float64, grads)}
    for what, (dtype, case_grads) in cases.items():
        got, expected = ([p.T for p in _arrays(dtype, seed=2)] for _ in range(2))
        if dtype == np.float64:
            got, expected = [p.T for p in got], [p.T for p in expected]
        wrappers.foreach_sgd_step(np, got, case_grads, [None] * len(got), 0.1, momentum=0.9)
        kernels_numpy.foreach_sgd_step(np, expected, case_grads, [None] * len(got), 0.1, momentum=0.9)
        _assert_lists_equal(got, expected)


def test_sgd_lists_of_different_lengths_are_refused():
    params = _arrays(np.float32)[:2]
    for step in (wrappers.foreach_sgd_step, kernels_numpy.foreach_sgd_step):
        with pytest.raises(ValueError, match=r"foreach_sgd_step: .*'grads': 1"):
            step(np, params, params[:1], [None, None], 0.1)
    assert wrappers.foreach_sgd_step(np, [], [], [], 0.1) == []


# ---- the Adam / AdamW update ----------------------------------------------------------------------------------

ADAM_OPTIONS = [dict(weight_decay=wd, decoupled=dec, maximize=mx, amsgrad=ams)
                for wd, dec, mx, ams in itertools.product((0.0, 0.01), (False, True), (False, True), (False, True))
                if wd or not dec]


def _adam_steps(step, dtype, options, beta1, shapes=SHAPES, steps=(1, 2, 3)):
    """Three calls of `step` (a foreach_adam_step), parameter k at step steps[k % 3] + call - 1 (the step
    counts of one list differ when some parameters had no gradient at some step): every array afterwards."""
    options = dict(options)
    amsgrad = options.pop("amsgrad")
    params, grads = _arrays(dtype, shapes, seed=2), _arrays(dtype, shapes, seed=3)
    moments = [[np.zeros_like(p) for p in params] for _ in range(3 if amsgrad else 2)]
    maxima = moments[2] if amsgrad else [None] * len(params)
    for call in range(3):
        counts = [steps[k % len(steps)] + call for k in range(len(params))]
        step(np, params, grads, moments[0], moments[1], maxima, counts, 1e-2, beta1, 0.999, 1e-8, **options)
    return params, *moments


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta1", [0.9, 0.2])    # lerp weights 0.1 and 0.8: both sides of torch's formula
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_adam_is_bitwise_the_references(dtype, beta1, options):
    _assert_compiled_is_the_reference(_adam_steps, "foreach_adam_step", dtype, options, beta1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_on_many_arrays_on_any_thread_count_is_bitwise_the_references(num_threads, dtype):
    options = dict(weight_decay=0.01, decoupled=True, maximize=False, amsgrad=True)
    _assert_compiled_is_the_reference(_adam_steps, "foreach_adam_step", dtype, options, 0.9, _many_shapes())


def test_adam_with_amsgrad_for_some_parameters_only_is_the_references():
    def run(step):
        params, grads = _arrays(np.float32, seed=2)[:3], _arrays(np.float32, seed=3)[:3]
        moments = [[np.zeros_like(p) for p in params] for _ in range(3)]
        maxima = [moments[2][0], None, moments[2][2]]
        step(np, params, grads, moments[0], moments[1], maxima, [1, 1, 1], 1e-2, 0.9, 0.999, 1e-8)
        return params, *moments

    _assert_compiled_is_the_reference(run, "foreach_adam_step")


# ---- thread counts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_one_and_two_threads_give_the_same_bits(dtype):
    def run():
        arrays = _arrays(dtype)
        norms = wrappers.norms(np, arrays, 2.0)
        wrappers.scale_(np, arrays, 0.3)
        params = _arrays(dtype, seed=4)
        buffers = wrappers.foreach_sgd_step(np, params, arrays, [None] * len(params), 0.1, momentum=0.9)
        buffers = wrappers.foreach_sgd_step(np, params, arrays, buffers, 0.1, momentum=0.9)
        return [norms, *arrays, *params, *buffers]

    _assert_lists_equal(_with_threads(2, run), _with_threads(1, run))
