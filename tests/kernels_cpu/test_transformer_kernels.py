"""The compiled Transformer kernels (tanh GELU, softmax over the last axis, causal or not, LayerNorm, scaled
dot-product attention) against the NumPy reference kernels.

Tolerances. Softmax and LayerNorm, float64: the same formulas except the order of the row sums (vector lanes instead of
NumPy's pairwise sum and einsum) and libm's exp for NumPy's: a few ulp (rtol 1e-12). float32: also our
vectorised exp (<= 1 ulp, tests/kernels_cpu/test_compiled_kernels.py): rtol 2e-5 / atol 2e-6, as there.
LayerNorm's weight and bias gradients are column sums over all rows, added in chunks of rows here and
pairwise (einsum, sum) there: their atol grows with the row count.
GELU (float32 only; float64 runs the reference, see kernels_cpu/wrappers.py): the compiled form
x / (1 + exp(-2u)) against the reference's 0.5 x (1 + tanh(u)). Their difference is mostly the
reference's own error: its backward's 1 - t^2 keeps only the ulps of 1 where t is near +-1, up to ~5e-6
on inputs of scale 3 (the compiled kernel's error there is ~7e-7), hence GELU_TOL. Against float64 math
the compiled kernel is no less accurate than the reference (checked below).
Attention: its products add in another order than the BLAS's, and backward's p (dp - rowdot) cancels where p is
small, so entries are compared to the largest one (ATTENTION_TOL of it, about 3x the largest error seen).
"""
import numpy as np
import pytest

import disttrain as dt
from disttrain.kernels_cpu import native, wrappers
from disttrain.models.transformer_lm import TransformerLanguageModel
from disttrain.tensor import kernels_numpy, threads

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason=f"compiled CPU kernels unavailable: {native.unavailable_reason()}")

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-15)}
GELU_TOL = dict(rtol=2e-5, atol=1e-5)
ATTENTION_TOL = {np.float32: 2e-6, np.float64: 1e-14}


def _r(shape, dtype, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


# ---- GELU ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2048, 512), (3, 5, 7), (1,), ()])
def test_gelu_equals_the_numpy_kernels(num_threads, shape):
    x, grad_y = _r(shape, np.float32, scale=3.0), _r(shape, np.float32, 1)
    y = wrappers.gelu_forward(np, x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, kernels_numpy.gelu_forward(np, x), **GELU_TOL)
    grad_x = wrappers.gelu_backward(np, grad_y, x)
    assert grad_x.dtype == np.float32 and grad_x.shape == x.shape
    np.testing.assert_allclose(grad_x, kernels_numpy.gelu_backward(np, grad_y, x), **GELU_TOL)


def test_gelu_is_at_least_as_accurate_as_the_reference():
    x = np.linspace(-12, 12, 100_001, dtype=np.float32)
    grad_y = np.ones_like(x)
    exact_y = kernels_numpy.gelu_forward(np, x.astype(np.float64))
    exact_grad = kernels_numpy.gelu_backward(np, grad_y.astype(np.float64), x.astype(np.float64))
    for compiled, reference, exact in [
            (wrappers.gelu_forward(np, x), kernels_numpy.gelu_forward(np, x), exact_y),
            (wrappers.gelu_backward(np, grad_y, x), kernels_numpy.gelu_backward(np, grad_y, x), exact_grad)]:
        compiled_error = np.abs(compiled - exact).max()
        reference_error = np.abs(reference - exact).max()
        assert compiled_error <= 1.25 * reference_error, (compiled_error, reference_error)


def test_gelu_limits_nan_and_any_layout():
    x = np.array([-np.inf, -1e4, -40, 0, 40, 1e4, np.inf, np.nan], np.float32)
    y = wrappers.gelu_forward(np, x)
    np.testing.assert_array_equal(y[1:7], [0, 0, 0, 40, 1e4, np.inf])
    assert np.isnan(y[0]) and np.isnan(y[7])               # -inf * 0, as the reference's
    grad = wrappers.gelu_backward(np, np.ones_like(x), x)
    np.testing.assert_array_equal(grad[1:6], [0, 0, 0.5, 1, 1])
    assert np.isnan(grad[7])
    strided = _r((6, 8), np.float32)[:, ::2]
    np.testing.assert_allclose(wrappers.gelu_forward(np, strided), kernels_numpy.gelu_forward(np, strided),
                               **GELU_TOL)
    np.testing.assert_allclose(wrappers.gelu_backward(np, strided.T, strided.T),
                               kernels_numpy.gelu_backward(np, strided.T, strided.T), **GELU_TOL)


# float64: libm's erfc(-x / sqrt 2) carries the rounding of x / sqrt 2, up to x^2 / 2 ulps in the left tail (the
# reference computes exp(-x^2 / 2) without it); 3e-13 at x = -30
@pytest.mark.parametrize("dtype, tol", [(np.float32, dict(rtol=2e-6, atol=1e-7)), (np.float64, dict(rtol=1e-12))])
def test_gelu_exact_form_equals_the_numpy_kernels(dtype, tol):
    x = (np.random.default_rng(0).standard_normal((257, 33)) * 4).astype(dtype)
    x[0, :4] = [-30.0, 0.0, np.inf, np.nan]
    grad_y = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
    np.testing.assert_allclose(wrappers.gelu_erf_forward(np, x), kernels_numpy.gelu_erf_forward(np, x), **tol)
    np.testing.assert_allclose(wrappers.gelu_erf_backward(np, grad_y, x), kernels_numpy.gelu_erf_backward(np, grad_y, x),
                               **tol)


def test_gelu_in_float64_and_other_dtypes_is_the_reference():
    for dtype in (np.float64, np.float16):
        x, grad_y = _r((4, 5), dtype), _r((4, 5), dtype, 1)
        np.testing.assert_array_equal(wrappers.gelu_forward(np, x), kernels_numpy.gelu_forward(np, x))
        np.testing.assert_array_equal(wrappers.gelu_backward(np, grad_y, x), kernels_numpy.gelu_backward(np, grad_y, x))


# ---- softmax ---------------------------------------------------------------------------------------------

SOFTMAX_SHAPES = [(32, 4, 64, 64), (2, 3, 5, 7), (2, 7, 5), (1, 1), (4, 33)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_equals_the_numpy_kernels(num_threads, dtype, shape, causal):
    x, grad_y = _r(shape, dtype, scale=3.0), _r(shape, dtype, 1)
    y = wrappers.softmax_forward(np, x, causal)
    expected = kernels_numpy.softmax_forward(np, x, causal)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, expected, **TOL[dtype])
    if causal:                                              # left-out keys: exactly 0
        assert not y[..., ~np.tri(shape[-2], shape[-1], dtype=bool)].any()
    np.testing.assert_allclose(wrappers.softmax_backward(np, grad_y, y),
                               kernels_numpy.softmax_backward(np, grad_y, expected), **TOL[dtype])
    strided = np.asfortranarray(grad_y)                     # copied to C order for the kernel
    np.testing.assert_allclose(wrappers.softmax_backward(np, strided, y),
                               kernels_numpy.softmax_backward(np, grad_y, expected), **TOL[dtype])


def test_softmax_rows_of_minus_inf_huge_scores_and_any_layout():
    # the last row has no finite maximum to shift by (inf - inf): NaN where the reference has it, else 0
    x = np.array([[-np.inf, -np.inf, -np.inf], [1000, 1001, -1000], [0, -np.inf, 2], [np.inf, 5, 1]], np.float32)
    for causal in (False, True):
        with np.errstate(invalid="ignore"):
            expected = kernels_numpy.softmax_forward(np, x, causal)
        np.testing.assert_allclose(wrappers.softmax_forward(np, x, causal), expected, **TOL[np.float32])
    assert not wrappers.softmax_forward(np, x)[0].any()     # nothing to attend to: zeros, no NaN
    scores = _r((3, 6, 6), np.float64).transpose(0, 2, 1)
    np.testing.assert_allclose(wrappers.softmax_forward(np, scores, True),
                               kernels_numpy.softmax_forward(np, scores, True), **TOL[np.float64])
    causal_wide = _r((4, 9), np.float64)                    # more keys than queries: top-left triangle
    np.testing.assert_allclose(wrappers.softmax_forward(np, causal_wide, True),
                               kernels_numpy.softmax_forward(np, causal_wide, True), **TOL[np.float64])


def test_row_blocks_on_two_threads_give_the_same_bits():
    x, grad_y = _r((32, 4, 64, 64), np.float32, scale=3.0), _r((32, 4, 64, 64), np.float32, 1)
    h, grad_h = _r((2048, 512), np.float32, 2, scale=3.0), _r((2048, 512), np.float32, 3)
    results = []
    for n in (1, 2):
        before = threads.get_num_threads()
        threads.set_num_threads(n)
        try:
            y = wrappers.softmax_forward(np, x, True)
            results.append([y, wrappers.softmax_backward(np, grad_y, y), wrappers.gelu_forward(np, h),
                            wrappers.gelu_backward(np, grad_h, h)])
        finally:
            threads.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_a_transformer_step_uses_the_compiled_kernels(kernel_calls):
    called = kernel_calls("gelu_forward", "gelu_backward", "attention_forward", "attention_backward")
    dt.manual_seed(0)
    model = TransformerLanguageModel(11, d_model=8, heads=2, layers=2, d_ff=16, max_len=6)
    tokens = dt.tensor(np.arange(12).reshape(6, 2) % 11)
    loss, _ = model.forward_loss(tokens, tokens)
    loss.backward()
    assert sorted(set(called)) == ["attention_backward", "attention_forward", "gelu_backward", "gelu_forward"]
    assert len(called) == 8                                # once a block each


# ---- scaled dot-product attention -------------------------------------------------------------------------

def _projection_views(steps, batch, heads, width, dtype, seed=0):
    """q, k, v (B, H, T, E) cut from one (T, B, 3, H, E) projection, as the Transformer's attention cuts them."""
    return tuple(_r((steps, batch, 3, heads, width), dtype, seed, scale=2.0).transpose(2, 1, 3, 0, 4))


ATTENTION_CASES = {
    "model": lambda dtype: _projection_views(64, 32, 4, 32, dtype),
    "L<S, E!=Ev": lambda dtype: (_r((2, 3, 5, 7), dtype), _r((2, 3, 9, 7), dtype, 1), _r((2, 3, 9, 4), dtype, 2)),
    "L>S, 2-D": lambda dtype: (_r((9, 3), dtype), _r((4, 3), dtype, 1), _r((4, 40), dtype, 2)),
    "long rows": lambda dtype: (_r((1, 70, 16), dtype), _r((1, 70, 16), dtype, 1), _r((1, 70, 33), dtype, 2)),
    "Fortran v": lambda dtype: (_r((2, 6, 5), dtype), _r((2, 6, 5), dtype, 1),
                                np.asfortranarray(_r((2, 6, 5), dtype, 2))),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_the_numpy_kernels(num_threads, dtype, case, causal):
    q, k, v = ATTENTION_CASES[case](dtype)
    scale = 1 / np.sqrt(q.shape[-1])
    out, lse = wrappers.attention_forward(np, q, k, v, scale, causal)
    want_out, want_lse = kernels_numpy.attention_forward(np, q, k, v, scale, causal)
    assert out.dtype == lse.dtype == dtype and out.shape == want_out.shape and lse.shape == want_lse.shape
    _assert_attention_close(out, want_out, dtype, "out")
    _assert_attention_close(lse, want_lse, dtype, "lse")
    grad_out = _r(out.shape, dtype, 3)
    grads = wrappers.attention_backward(np, grad_out, q, k, v, out, lse, scale, causal)
    wants = kernels_numpy.attention_backward(np, grad_out, q, k, v, want_out, want_lse, scale, causal)
    for name, got, want, like in zip("qkv", grads, wants, (q, k, v)):
        assert got.dtype == dtype and got.shape == like.shape, name
        _assert_attention_close(got, want, dtype, f"d{name}")


def _assert_attention_close(got, want, dtype, what):
    np.testing.assert_allclose(got, want, rtol=TOL[dtype]["rtol"], atol=ATTENTION_TOL[dtype] * np.abs(want).max(),
                               err_msg=what)


def test_attention_output_and_gradients_take_their_inputs_layout():
    """A view of a projection's rows comes back laid out as that projection: transposing it back is free."""
    q, k, v = _projection_views(6, 2, 3, 4, np.float32)
    out, lse = wrappers.attention_forward(np, q, k, v, 0.5, True)
    assert out.transpose(2, 0, 1, 3).flags.c_contiguous and lse.flags.c_contiguous
    for grad in wrappers.attention_backward(np, out, q, k, v, out, lse, 0.5, True):
        assert grad.transpose(2, 0, 1, 3).flags.c_contiguous


def test_attention_on_two_threads_gives_the_same_bits_and_odd_inputs_go_to_the_reference():
    q, k, v = _projection_views(64, 32, 4, 32, np.float32)
    results = []
    for n in (1, 2):
        before = threads.get_num_threads()
        threads.set_num_threads(n)
        try:
            out, lse = wrappers.attention_forward(np, q, k, v, 0.25, True)
            results.append([out, lse, *wrappers.attention_backward(np, out, q, k, v, out, lse, 0.25, True)])
        finally:
            threads.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    broadcast = (q, k[:1], v[:1])                           # leading axes differ: the reference broadcasts
    np.testing.assert_array_equal(wrappers.attention_forward(np, *broadcast, 0.25, False)[0],
                                  kernels_numpy.attention_forward(np, *broadcast, 0.25, False)[0])
    half = tuple(a.astype(np.float16) for a in (q[0, :1], k[0, :1], v[0, :1]))
    np.testing.assert_array_equal(wrappers.attention_forward(np, *half, 0.25, True)[0],
                                  kernels_numpy.attention_forward(np, *half, 0.25, True)[0])


# ---- LayerNorm -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, size", [(2048, 128), (3, 7), (1, 1), (130, 33)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_equals_the_numpy_kernels(num_threads, dtype, rows, size, affine):
    x, grad_y = _r((rows, size), dtype, scale=2.0) + 1, _r((rows, size), dtype, 1)
    weight, bias = (_r(size, dtype, 2), _r(size, dtype, 3)) if affine else (None, None)
    got = wrappers.layer_norm_forward(np, x, weight, bias, 1e-5)
    expected = kernels_numpy.layer_norm_forward(np, x, weight, bias, 1e-5)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.shape == e.shape
        np.testing.assert_allclose(g, e, **TOL[dtype])
    for with_bias in (False, True):
        got = wrappers.layer_norm_backward(np, grad_y, x, weight, *expected[1:], with_bias=with_bias)
        want = kernels_numpy.layer_norm_backward(np, grad_y, x, weight, *expected[1:], with_bias=with_bias)
        np.testing.assert_allclose(got[0], want[0], **TOL[dtype])
        for g, e in zip(got[1:], want[1:]):                  # column sums over the rows, in another order
            assert (g is None) == (e is None)
            if g is not None:
                np.testing.assert_allclose(g, e, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * 10 * rows)


def test_layer_norm_any_layout_and_the_same_bits_on_two_threads():
    x, grad_y = _r((2048, 128), np.float32, scale=2.0), _r((128, 2048), np.float32, 1).T   # grad_y strided
    weight = _r((2, 128), np.float32, 2)[1]
    results = []
    for n in (1, 2):
        before = threads.get_num_threads()
        threads.set_num_threads(n)
        try:
            y, mean, rstd = wrappers.layer_norm_forward(np, x, weight, None, 1e-5)
            results.append([y, mean, rstd, *wrappers.layer_norm_backward(np, grad_y, x, weight, mean, rstd, True)])
        finally:
            threads.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    want = kernels_numpy.layer_norm_backward(np, np.ascontiguousarray(grad_y), x, weight, *results[0][1:3], True)
    np.testing.assert_allclose(results[0][3], want[0], **TOL[np.float32])


def test_layer_norm_op_uses_the_kernels_and_keeps_its_gradients(kernel_calls):
    called = kernel_calls("layer_norm_forward", "layer_norm_backward")
    x = dt.tensor(_r((4, 3, 6), np.float64), requires_grad=True)
    w, b = (dt.tensor(_r((3, 6), np.float64, k), requires_grad=True) for k in (1, 2))
    dt.nn.functional.layer_norm(x, (3, 6), w, b).sum().backward()
    assert called == ["layer_norm_forward", "layer_norm_backward"]
    assert x.grad.shape == x.shape and w.grad.shape == b.grad.shape == (3, 6)
