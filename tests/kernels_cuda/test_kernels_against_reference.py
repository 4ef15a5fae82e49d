"""Every CUDA kernel (through its wrapper) equals its NumPy reference, run two ways:

  - "cuda": on a GPU, CuPy arrays (marked `gpu`; skipped without a GPU);
  - "emulated": on the CPU, NumPy arrays, each kernel's .cu code compiled as C++ and run by
    disttrain.kernels_cuda.emulator (skipped without a C++ compiler). This runs in CI: the kernels'
    arithmetic, indexing and launch shapes are checked there, without the GPU's own rounding.
(The `cp` fixture, tests/kernels_cuda/conftest.py.)

Shapes cover the edges of each launch configuration: single elements, sizes that are not multiples
of the block, narrow and wide softmax rows (warp- and block-per-row kernels), rows beyond the
65535 grid limit. float64 is compared tightly; float32 within a few ulps of accumulated rounding.
"""
import numpy as np
import pytest

from disttrain.kernels_cuda import launch_config as launch, loader, wrappers as W
from disttrain.tensor import kernels_numpy as K

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-11)}
DTYPES = [np.float32, np.float64]


def _r(shape, dtype, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _close(got, expected, dtype, **kw):
    np.testing.assert_allclose(_host(got), expected, **dict(TOL[dtype], **kw))


def test_every_kernel_compiles_and_loads(cp):
    loader.compile_all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1000,), (3, 5, 7), (2, 70_000)])
def test_sigmoid(cp, dtype, shape):
    x = _r(shape, dtype, scale=20.0)
    _close(W.sigmoid(cp, cp.array(x)), K.sigmoid(np, x), dtype)
    strided = _r((4, 6), dtype)[:, ::2]
    _close(W.sigmoid(cp, cp.array(_r((4, 6), dtype))[:, ::2]), K.sigmoid(np, strided), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", K.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 1), (37, 513), (4, 3, 300), (70_000, 3)])
def test_bias_act_forward_and_backward(cp, dtype, act, shape):
    x, b, gy = _r(shape, dtype), _r(shape[-1:], dtype, 1), _r(shape, dtype, 2)
    for bias in (b, None):
        y = K.bias_act_forward(np, x, bias, act)
        y_gpu = W.bias_act_forward(cp, cp.array(x), None if bias is None else cp.array(bias), act)
        _close(y_gpu, y, dtype)
    gx, gb = K.bias_act_backward(np, gy, y, act, with_bias=True)
    gx_gpu, gb_gpu = W.bias_act_backward(cp, cp.array(gy), cp.array(y), act, with_bias=True)
    _close(gx_gpu, gx, dtype)
    _close(gb_gpu, gb, dtype, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4 if dtype == np.float32 else 1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, hidden", [(1, 1), (20, 200), (7, 650), (3, 1500)])
def test_lstm_cell_forward_and_backward(cp, dtype, batch, hidden):
    gates_x, h, c = _r((batch, 4 * hidden), dtype), _r((batch, hidden), dtype, 1), _r((batch, hidden), dtype, 2)
    w_hh = _r((4 * hidden, hidden), dtype, 3, scale=hidden ** -0.5)
    ref = K.lstm_cell_forward(np, gates_x, h, c, w_hh)
    got = W.lstm_cell_forward(cp, *(cp.array(a) for a in (gates_x, h, c, w_hh)))
    for g, r in zip(got, ref):
        _close(g, r, dtype)
    dh, dc = _r((batch, hidden), dtype, 4), _r((batch, hidden), dtype, 5)
    _, _, acts, tanh_c = ref
    ref_grads = K.lstm_cell_backward(np, dh, dc, acts, tanh_c, h, c, w_hh)
    got_grads = W.lstm_cell_backward(cp, *(cp.array(a) for a in (dh, dc, acts, tanh_c, h, c, w_hh)))
    for g, r in zip(got_grads, ref_grads):
        _close(g, r, dtype, atol=1e-4 if dtype == np.float32 else 1e-10)  # GEMM sums of `batch` terms


XENT_SHAPES = [(1, 1), (5, 3), (33, 1024), (33, 1025), (400, 10_000), (7, 50_000), (70_000, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, c", XENT_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_cross_entropy_forward_and_backward(cp, dtype, n, c, scale):
    logits = _r((n, c), dtype, scale=scale)
    target = np.random.default_rng(1).integers(0, c, n)
    target[::3] = -100
    losses, _ = K.cross_entropy_forward(np, logits, target, -100)
    got_losses, lse = W.cross_entropy_forward(cp, cp.array(logits), cp.array(target), -100)
    _close(got_losses, losses, dtype, atol=1e-4 * max(scale, 1) if dtype == np.float32 else 1e-9 * scale)
    safe = np.where(target == -100, 0, target)
    row_scale = np.where(target == -100, 0, 1.0 / n).astype(dtype)
    expected = K.cross_entropy_backward(np, logits, safe, None, row_scale)
    for saved in (lse, None):
        grad = W.cross_entropy_backward(cp, cp.array(logits), cp.array(safe), saved, cp.array(row_scale))
        _close(grad, expected, dtype)
    assert launch.softmax_config(n, c, np.dtype(dtype).itemsize).kind == ("warp" if c <= 1024 else "block")


def test_cross_entropy_extreme_rows(cp):
    logits = np.array([[0.0, -np.inf, 1.0], [np.inf, 0.0, 0.0], [-1e30, 1e30, 0.0]], dtype=np.float32)
    target = np.array([0, 1, 1])
    got, _ = W.cross_entropy_forward(cp, cp.array(logits), cp.array(target), -100)
    got = _host(got)
    assert got[0] == pytest.approx(np.log(1 + np.e) , rel=1e-6) and got[2] == 0.0
    assert np.isposinf(got[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_index, vocab, dim", [(1, 1, 1), (400, 10_000, 200), (5000, 3, 33), (70_000, 10, 4)])
def test_index_add_rows(cp, dtype, n_index, vocab, dim):
    rng = np.random.default_rng(0)
    index = rng.integers(-vocab, vocab, n_index)  # repeated and negative indices
    values = _r((n_index, dim), dtype)
    target = _r((vocab, dim), dtype, 1)
    expected = target.copy()
    K.index_add_rows(np, expected, index, values)
    got = cp.array(target)
    W.index_add_rows(cp, got, cp.array(index), cp.array(values))
    atol = 1e-5 * np.sqrt(n_index) if dtype == np.float32 else 1e-10  # atomics sum in any order
    _close(got, expected, dtype, atol=atol)


SGD_CASES = [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
             dict(momentum=0.5, dampening=0.3, weight_decay=0.1, maximize=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 1_000_003])
@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_step(cp, dtype, n, case):
    p = _r(n, dtype)
    p_gpu, buf, buf_gpu = cp.array(p), None, None
    for step in range(3):
        g = _r(n, dtype, step + 1)
        buf = K.sgd_step(np, p, g, buf, 0.1, **case)
        buf_gpu = W.sgd_step(cp, p_gpu, cp.array(g), buf_gpu, 0.1, **case)
    _close(p_gpu, p, dtype)
    if buf is not None:
        _close(buf_gpu, buf, dtype)


ADAM_CASES = [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled=True), dict(maximize=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 1_000_003])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_step(cp, dtype, n, amsgrad, case):
    p = _r(n, dtype)
    state = [np.zeros(n, dtype) for _ in range(3)]
    gpu = [cp.array(p)] + [cp.array(s) for s in state]
    for step in range(1, 4):
        g = _r(n, dtype, step)
        K.adam_step(np, p, g, state[0], state[1], state[2] if amsgrad else None, step, 1e-2, 0.9, 0.999, 1e-8,
                    **case)
        W.adam_step(cp, gpu[0], cp.array(g), gpu[1], gpu[2], gpu[3] if amsgrad else None, step, 1e-2, 0.9,
                    0.999, 1e-8, **case)
    for got, expected in zip(gpu, [p] + state):
        _close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, float("inf"), 3.0, 1.0])
def test_norms_scale_and_device_clipping(cp, dtype, p):
    arrays = [_r(s, dtype, k) for k, s in enumerate([(1,), (300, 7), (1_000_003,)])]
    expected = K.norms(np, [a.astype(np.float64) for a in arrays], p)
    _close(W.norms(cp, [cp.array(a) for a in arrays], p), expected, dtype, rtol=1e-5 if dtype == np.float32 else 1e-11)
    total = float(np.linalg.norm(expected, ord=p))
    for max_norm in (total / 3, total * 3):
        ref = [a.copy() for a in arrays]
        ref_total = K.clip_by_total_norm_(np, ref, max_norm, p)
        got = [cp.array(a) for a in arrays]
        got_total = W.clip_by_total_norm_(cp, got, max_norm, p)
        assert float(got_total) == pytest.approx(float(ref_total), rel=1e-5 if dtype == np.float32 else 1e-11)
        for g, r in zip(got, ref):
            _close(g, r, dtype)
    scaled = [cp.array(a) for a in arrays]
    W.scale_(cp, scaled, 0.3)
    for g, a in zip(scaled, arrays):
        _close(g, a * dtype(0.3), dtype)


def test_norms_propagate_nan_and_inf(cp):
    bad = cp.array(np.array([1.0, np.nan, 2.0], np.float32))
    assert np.isnan(_host(W.norms(cp, [bad], 2.0))[0])
    assert np.isnan(_host(W.norms(cp, [bad], float("inf")))[0])
    inf = cp.array(np.array([1.0, -np.inf], np.float32))
    assert np.isposinf(_host(W.norms(cp, [inf], float("inf")))[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_bucket_pack_and_unpack(cp, dtype):
    arrays = [_r(s, dtype, k) for k, s in enumerate([(2, 3), (1,), (1000, 17)])]
    flat = W.bucket_pack(cp, [cp.array(a) for a in arrays])
    _close(flat, K.bucket_pack(np, arrays), dtype, rtol=0, atol=0)
    out = [cp.zeros(a.shape, dtype) for a in arrays]
    W.bucket_unpack(cp, flat * 4, out, scale=0.25)
    for o, a in zip(out, arrays):
        _close(o, a, dtype)


BEYOND_ONE_GRID = launch.GRID_CAP * launch.BLOCK + 12345  # threads loop: some draw two samples


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1000,), (3, 5, 7), (2, 70_000), (BEYOND_ONE_GRID,)])
@pytest.mark.parametrize("seed, offset", [(0, 0), (1234, 99), (2 ** 64 - 1, 2 ** 64 - 500), (-3, 2 ** 33)])
def test_counter_uniform_equals_the_reference_bit_for_bit(cp, dtype, shape, seed, offset):
    got = W.counter_uniform(cp, shape, dtype, seed, offset)
    assert got.shape == shape and got.dtype == dtype
    np.testing.assert_array_equal(_host(got), K.counter_uniform(np, shape, dtype, seed, offset))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (2048, 512), (2, 70_000)])
def test_gelu_forward_and_backward(cp, dtype, shape):
    x, grad_y = _r(shape, dtype, scale=3.0), _r(shape, dtype, 1)
    # float32: the kernel's x / (1 + exp(-2u)) against the reference's 0.5 x (1 + tanh(u)), whose 1 - t^2
    # in backward keeps only the ulps of 1 where t is near +-1 (tests/kernels_cpu/test_transformer_kernels.py)
    atol = dict(atol=1e-5) if dtype == np.float32 else {}
    _close(W.gelu_forward(cp, cp.array(x)), K.gelu_forward(np, x), dtype, **atol)
    _close(W.gelu_backward(cp, cp.array(grad_y), cp.array(x)), K.gelu_backward(np, grad_y, x), dtype, **atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (2, 70_000)])
def test_gelu_exact_form_forward_and_backward(cp, dtype, shape):
    x, grad_y = _r(shape, dtype, scale=4.0), _r(shape, dtype, 1)
    x.flat[0] = -30.0  # the left tail, where Phi comes from erfc
    _close(W.gelu_erf_forward(cp, cp.array(x)), K.gelu_erf_forward(np, x), dtype)
    _close(W.gelu_erf_backward(cp, cp.array(grad_y), cp.array(x)), K.gelu_erf_backward(np, grad_y, x), dtype)


SOFTMAX_SHAPES = [(1, 1), (2, 3, 5, 7), (32, 4, 64, 64), (3, 1024), (3, 1025), (5, 5000), (70_000, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_forward_and_backward(cp, dtype, shape, causal):
    x, grad_y = _r(shape, dtype, scale=3.0), _r(shape, dtype, 1)
    y = K.softmax_forward(np, x, causal)
    _close(W.softmax_forward(cp, cp.array(x), causal), y, dtype)
    _close(W.softmax_backward(cp, cp.array(grad_y), cp.array(y)), K.softmax_backward(np, grad_y, y), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_forward_and_backward(cp, dtype, causal):
    """The CUDA table's attention (cuBLAS's GEMMs around softmax.cu) against the reference: the same out and
    gradients, though it saves the probabilities where the reference saves the row log-sum-exp."""
    q, k, v = _r((2, 3, 5, 4), dtype, scale=2.0), _r((2, 3, 6, 4), dtype, 1, scale=2.0), _r((2, 3, 6, 3), dtype, 2)
    grad_out = _r((2, 3, 5, 3), dtype, 3)
    out, lse = K.attention_forward(np, q, k, v, 0.5, causal)
    on_gpu = [cp.array(a) for a in (q, k, v)]
    got, probabilities = W.attention_forward(cp, *on_gpu, 0.5, causal)
    _close(got, out, dtype)
    assert probabilities.shape == (2, 3, 5, 6)
    expected = K.attention_backward(np, grad_out, q, k, v, out, lse, 0.5, causal)
    for g, e in zip(W.attention_backward(cp, cp.array(grad_out), *on_gpu, got, probabilities, 0.5, causal), expected):
        _close(g, e, dtype)


def test_softmax_rows_without_a_finite_score(cp):
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, 2.0], [1000.0, 1001.0, -1000.0]], np.float32)
    for causal in (False, True):
        _close(W.softmax_forward(cp, cp.array(x), causal), K.softmax_forward(np, x, causal), np.float32)
    wide = np.full((2, 3000), -np.inf, np.float64)             # the block-per-row kernel
    wide[1, 7] = 0.0
    got = _host(W.softmax_forward(cp, cp.array(wide)))
    assert not got[0].any() and got[1, 7] == 1.0 and got[1].sum() == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, size", [(1, 1), (3, 7), (2048, 128), (5, 1500), (70_000, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_forward_and_backward(cp, dtype, rows, size, affine):
    x, grad_y = _r((rows, size), dtype, scale=2.0) + 1, _r((rows, size), dtype, 1)
    weight, bias = (_r(size, dtype, 2), _r(size, dtype, 3)) if affine else (None, None)
    on_gpu = [None if a is None else cp.array(a) for a in (weight, bias)]
    expected = K.layer_norm_forward(np, x, weight, bias, 1e-5)
    got = W.layer_norm_forward(cp, cp.array(x), *on_gpu, 1e-5)
    for g, e in zip(got, expected):
        _close(g, e, dtype)
    want = K.layer_norm_backward(np, grad_y, x, weight, *expected[1:], with_bias=True)
    grads = W.layer_norm_backward(cp, cp.array(grad_y), cp.array(x), on_gpu[0], *(cp.array(a) for a in expected[1:]),
                                  with_bias=True)
    _close(grads[0], want[0], dtype)
    for g, e in zip(grads[1:], want[1:]):                    # column sums over `rows` rows, in row order
        assert (g is None) == (e is None)
        if g is not None:
            _close(g, e, dtype, atol=(1e-6 if dtype == np.float32 else 1e-12) * rows)
