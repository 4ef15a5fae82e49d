"""The NumPy reference kernels (disttrain.tensor.kernels_numpy) against independent math.

These references are what every CUDA kernel is compared with on a GPU (tests/gpu), so each is
checked here on its own: forward values against scalar formulas written out in float64, and
backward values against central finite differences.
"""
import math

import numpy as np
import pytest

from disttrain.tensor import kernels_numpy as K

RNG = np.random.default_rng(1234)


def _r(*shape, scale=1.0):
    return RNG.standard_normal(shape) * scale


def _numeric_grad(f, x, eps=1e-6):
    """d f / d x by central differences (f returns a float; x is changed in place and restored)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        down = f()
        x[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad


# ---- sigmoid -------------------------------------------------------------------------------------------

def test_sigmoid_matches_the_formula_and_never_overflows():
    x = np.concatenate([np.linspace(-30, 30, 121), [-1000.0, 1000.0, 0.0]])
    with np.errstate(over="raise"):
        got = K.sigmoid(np, x)
    expected = [1 / (1 + math.exp(-v)) if v > -700 else 0.0 for v in x]
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=1e-300)
    assert K.sigmoid(np, x.astype(np.float32)).dtype == np.float32


# ---- LSTM cell -----------------------------------------------------------------------------------------

def _lstm_inputs(b=3, h=4):
    return _r(b, 4 * h), _r(b, h), _r(b, h), _r(4 * h, h, scale=0.5)


def test_lstm_cell_forward_matches_scalar_formulas():
    gates_x, h, c, w_hh = _lstm_inputs()
    h_new, c_new, acts, tanh_c = K.lstm_cell_forward(np, gates_x, h, c, w_hh)
    batch, hidden = h.shape
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    for b in range(batch):
        for j in range(hidden):
            pre = [gates_x[b, k * hidden + j] + math.fsum(h[b, m] * w_hh[k * hidden + j, m] for m in range(hidden))
                   for k in range(4)]
            i, f, g, o = sig(pre[0]), sig(pre[1]), math.tanh(pre[2]), sig(pre[3])
            cn = f * c[b, j] + i * g
            assert c_new[b, j] == pytest.approx(cn, rel=1e-12)
            assert h_new[b, j] == pytest.approx(o * math.tanh(cn), rel=1e-12)
            assert tanh_c[b, j] == pytest.approx(math.tanh(cn), rel=1e-12)
            np.testing.assert_allclose(acts[b, j::hidden], [i, f, g, o], rtol=1e-12)


def test_lstm_cell_backward_matches_finite_differences():
    inputs = list(_lstm_inputs())
    dh, dc = _r(3, 4), _r(3, 4)

    def objective():
        h_new, c_new, _, _ = K.lstm_cell_forward(np, *inputs)
        return float((h_new * dh).sum() + (c_new * dc).sum())

    _, _, acts, tanh_c = K.lstm_cell_forward(np, *inputs)
    gates_x, h, c, w_hh = inputs
    grads = K.lstm_cell_backward(np, dh, dc, acts, tanh_c, h, c, w_hh)
    for name, x, g in zip(("gates_x", "h", "c", "w_hh"), inputs, (grads[0], grads[1], grads[2], grads[3])):
        np.testing.assert_allclose(g, _numeric_grad(objective, x), rtol=1e-6, atol=1e-8, err_msg=name)


def _layer_inputs(t=4, b=3, h=4):
    return _r(t, b, 4 * h), _r(b, h), _r(b, h), _r(4 * h, h, scale=0.5)


def test_lstm_layer_forward_equals_the_cell_step_by_step():
    gates_x, h, c, w_hh = _layer_inputs()
    out, cs, acts, tanh_c = K.lstm_layer_forward(np, gates_x.copy(), h, c, w_hh)
    for t in range(gates_x.shape[0]):
        h, c, step_acts, step_tanh_c = K.lstm_cell_forward(np, gates_x[t], h, c, w_hh)
        for layer_value, cell_value in ((out[t], h), (cs[t], c), (acts[t], step_acts), (tanh_c[t], step_tanh_c)):
            np.testing.assert_array_equal(layer_value, cell_value)  # the same arithmetic, bit for bit


def test_lstm_layer_backward_matches_finite_differences():
    inputs = list(_layer_inputs())
    d_out, dh_n, dc_n = _r(4, 3, 4), _r(3, 4), _r(3, 4)

    def objective():
        out, cs, _, _ = K.lstm_layer_forward(np, inputs[0].copy(), *inputs[1:])
        return float((out * d_out).sum() + (out[-1] * dh_n).sum() + (cs[-1] * dc_n).sum())

    gates_x, h0, c0, w_hh = inputs
    out, cs, acts, tanh_c = K.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh)
    grads = K.lstm_layer_backward(np, d_out, dh_n, dc_n, acts, tanh_c, out, cs, h0, c0, w_hh)
    for name, x, g in zip(("gates_x", "h0", "c0", "w_hh"), inputs, grads):
        np.testing.assert_allclose(g, _numeric_grad(objective, x), rtol=1e-6, atol=1e-8, err_msg=name)


# ---- cross-entropy -------------------------------------------------------------------------------------

def _xent_case(n=6, c=9, scale=3.0):
    logits = _r(n, c, scale=scale)
    target = RNG.integers(0, c, n)
    target[2] = -100
    return logits, target


def _row_loss(row, t):
    m = max(row)
    return m + math.log(math.fsum(math.exp(v - m) for v in row)) - row[t]


@pytest.mark.parametrize("scale", [1.0, 1e4])  # 1e4: exp overflows unless the row maximum is subtracted
def test_cross_entropy_forward_matches_the_formula(scale):
    logits, target = _xent_case(scale=scale)
    losses, (exp, sumexp) = K.cross_entropy_forward(np, logits, target, -100, keep_softmax=True)
    expected = [0.0 if t == -100 else _row_loss(row, t) for row, t in zip(logits, target)]
    np.testing.assert_allclose(losses, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(exp.max(axis=1), 1.0, rtol=1e-15)  # shifted by the row maximum
    np.testing.assert_allclose(sumexp, exp.sum(axis=1), rtol=1e-12)
    assert K.cross_entropy_forward(np, logits, target, -100)[1] is None


def test_cross_entropy_backward_accepts_every_saved_form_and_matches_finite_differences():
    logits, target = _xent_case()
    row_scale = _r(6)
    safe = np.where(target == -100, 0, target)
    row_scale[target == -100] = 0  # the op gives ignored rows a zero scale

    def objective():
        return float((K.cross_entropy_forward(np, logits, target, -100)[0] * row_scale).sum())

    numeric = _numeric_grad(objective, logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1)) + logits.max(axis=1)
    kept = lambda: K.cross_entropy_forward(np, logits, target, -100, keep_softmax=True)[1]  # noqa: E731
    for saved in (kept(), lse, None):
        grad = K.cross_entropy_backward(np, logits, safe, saved, row_scale)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    saved = kept()
    assert K.cross_entropy_backward(np, logits, safe, saved, row_scale) is saved[0]  # consumed in place


# ---- embedding backward --------------------------------------------------------------------------------

def test_index_add_rows_accumulates_repeats_and_counts_negative_indices_from_the_end():
    target = _r(5, 3)
    index = np.array([[0, 4], [4, -1], [2, 0]])
    values = _r(3, 2, 3)
    expected = target.copy()
    for r in np.ndindex(index.shape):
        expected[index[r] % 5] += values[r]
    K.index_add_rows(np, target, index, values)
    np.testing.assert_allclose(target, expected, rtol=1e-15)


@pytest.mark.parametrize("bad", [5, -6])
def test_index_add_rows_refuses_out_of_range_rows(bad):
    with pytest.raises(IndexError):  # -6 must not wrap to -1 on its way through the sorted path
        K.index_add_rows(np, np.zeros((5, 3)), np.array([0, bad, 1]), _r(3, 3))


def test_index_add_rows_sums_the_rows_of_each_token():
    indices = np.array([1, 3, 1, 0, 1, 3])
    grad = _r(6, 4)
    out = np.zeros((6, 4))
    K.index_add_rows(np, out, indices, grad)
    for v in range(6):
        np.testing.assert_allclose(out[v], grad[indices == v].sum(axis=0), rtol=1e-14, atol=1e-15)


# ---- bias + activation ---------------------------------------------------------------------------------

ACT_FORMULAS = {"identity": lambda z: z, "relu": lambda z: max(z, 0.0), "tanh": math.tanh,
                "sigmoid": lambda z: 1 / (1 + math.exp(-z))}


@pytest.mark.parametrize("act", K.ACTIVATIONS)
def test_bias_act_forward_matches_the_formula(act):
    x, b = _r(2, 3, 5), _r(5)
    y = K.bias_act_forward(np, x, b, act)
    expected = np.vectorize(ACT_FORMULAS[act])(x + b)
    np.testing.assert_allclose(y, expected, rtol=1e-14)
    y0 = K.bias_act_forward(np, x, None, act)
    np.testing.assert_allclose(y0, np.vectorize(ACT_FORMULAS[act])(x), rtol=1e-14)
    assert y0 is not x


@pytest.mark.parametrize("act", K.ACTIVATIONS)
def test_bias_act_backward_matches_finite_differences(act):
    x, b, w = _r(4, 5), _r(5), _r(4, 5)
    x[np.abs(x + b) < 1e-3] += 0.1  # relu's kink

    def objective():
        return float((K.bias_act_forward(np, x, b, act) * w).sum())

    y = K.bias_act_forward(np, x, b, act)
    gx, gb = K.bias_act_backward(np, w, y, act, with_bias=True)
    np.testing.assert_allclose(gx, _numeric_grad(objective, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gb, _numeric_grad(objective, b), rtol=1e-6, atol=1e-8)
    assert K.bias_act_backward(np, w, y, act)[1] is None


def test_bias_act_rejects_unknown_activations():
    with pytest.raises(ValueError, match="gelu"):
        K.bias_act_forward(np, _r(2, 2), None, "gelu")


def test_relu_maps_nan_to_zero_as_the_kernel_does():
    assert K.bias_act_forward(np, np.array([np.nan, -1.0, 2.0]), None, "relu").tolist() == [0.0, 0.0, 2.0]


# ---- optimizer updates ---------------------------------------------------------------------------------

def _sgd_textbook(p, grads, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """torch.optim.SGD's documented algorithm, element by element in Python floats."""
    p = [float(v) for v in p]
    buf = None
    for g in grads:
        g = [-v if maximize else v for v in g]
        g = [gi + weight_decay * pi for gi, pi in zip(g, p)]
        if momentum:
            buf = list(g) if buf is None else [momentum * bi + (1 - dampening) * gi for bi, gi in zip(buf, g)]
            g = [gi + momentum * bi for gi, bi in zip(g, buf)] if nesterov else buf
        p = [pi - lr * gi for pi, gi in zip(p, g)]
    return p


@pytest.mark.parametrize("momentum, dampening, weight_decay, nesterov, maximize", [
    (0.0, 0.0, 0.0, False, False), (0.9, 0.0, 0.0, False, False), (0.9, 0.0, 0.01, True, False),
    (0.5, 0.3, 0.1, False, True)])
def test_sgd_step_follows_torchs_algorithm(momentum, dampening, weight_decay, nesterov, maximize):
    p0 = _r(6)
    grads = [_r(6) for _ in range(3)]
    p, buf = p0.copy(), None
    for g in grads:
        g_before = g.copy()
        buf = K.sgd_step(np, p, g, buf, 0.1, momentum, dampening, weight_decay, nesterov, maximize)
        np.testing.assert_array_equal(g, g_before)  # the gradient is never modified
    assert (buf is None) == (momentum == 0)
    np.testing.assert_allclose(p, _sgd_textbook(p0, grads, 0.1, momentum, dampening, weight_decay, nesterov,
                                                 maximize), rtol=1e-12)


def _adam_textbook(p, grads, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad):
    """Adam / AdamW as in Kingma & Ba and Loshchilov & Hutter (bias-corrected moments), float64."""
    p = p.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    vmax = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        vmax = np.maximum(vmax, v)
        v_hat = (vmax if amsgrad else v) / (1 - beta2 ** t)
        p = p - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("weight_decay, decoupled, amsgrad", [(0.0, False, False), (0.1, False, True),
                                                              (0.1, True, False), (0.1, True, True)])
def test_adam_step_follows_the_papers(weight_decay, decoupled, amsgrad):
    p0 = _r(8)
    grads = [_r(8) for _ in range(4)]
    p, m, v = p0.copy(), np.zeros(8), np.zeros(8)
    vmax = np.zeros(8) if amsgrad else None
    for t, g in enumerate(grads, 1):
        K.adam_step(np, p, g, m, v, vmax, t, 1e-2, 0.9, 0.999, 1e-8, weight_decay, decoupled)
    np.testing.assert_allclose(p, _adam_textbook(p0, grads, 1e-2, 0.9, 0.999, 1e-8, weight_decay, decoupled, amsgrad),
                               rtol=1e-10)


def test_adam_maximize_is_adam_on_the_negated_gradient():
    p1, p2 = _r(5), None
    p2 = p1.copy()
    g = _r(5)
    z = [np.zeros(5) for _ in range(4)]
    K.adam_step(np, p1, g, z[0], z[1], None, 1, 0.1, 0.9, 0.99, 1e-8, maximize=True)
    K.adam_step(np, p2, -g, z[2], z[3], None, 1, 0.1, 0.9, 0.99, 1e-8)
    np.testing.assert_array_equal(p1, p2)


# ---- norms, clipping, buckets ----------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, float("inf")])
def test_norms_are_per_array(p):
    arrays = [_r(3, 4), _r(5)]
    got = K.norms(np, arrays, p)
    expected = [max(abs(v) for v in a.ravel()) if p == float("inf") else
                math.fsum(abs(v) ** p for v in a.ravel()) ** (1 / p) for a in arrays]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("p", [2.0, float("inf"), 1.5])
def test_clip_by_total_norm_scales_to_max_norm(p):
    arrays = [_r(3, 4), _r(5)]
    flat = np.concatenate([a.ravel() for a in arrays])
    total = np.abs(flat).max() if p == float("inf") else (np.abs(flat) ** p).sum() ** (1 / p)
    before = [a.copy() for a in arrays]
    got = K.clip_by_total_norm_(np, arrays, total / 2, p)
    assert got.shape == () and got.dtype == np.float64 and float(got) == pytest.approx(total, rel=1e-12)
    for a, b in zip(arrays, before):
        np.testing.assert_allclose(a, b * (total / 2) / (total + 1e-6), rtol=1e-12)
    K.clip_by_total_norm_(np, arrays, total * 10, p)  # under the limit: untouched
    for a, b in zip(arrays, before):
        np.testing.assert_allclose(a, b * (total / 2) / (total + 1e-6), rtol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_clip_by_total_norm_treats_a_nonfinite_total_as_clip_grad_norm_does(bad):
    """A NaN total scales by NaN and an infinite one by 0 (inf * 0: NaN), as nn.utils.clip_grad_norm_ and torch."""
    from disttrain.nn.parameter import Parameter
    from disttrain.nn.utils import clip_grad_norm_
    from disttrain.tensor.tensor import Tensor

    arrays = [_r(3, 4), _r(5)]
    arrays[1][2] = bad
    params = [Parameter(a.copy()) for a in arrays]
    for p in params:
        p.grad = Tensor(p.data.copy())
    expected_total = clip_grad_norm_(params, 1.0)
    got_total = K.clip_by_total_norm_(np, arrays, 1.0)
    np.testing.assert_array_equal(float(got_total), expected_total)
    for a, p in zip(arrays, params):
        np.testing.assert_array_equal(a, p.grad.data)
    assert (np.isnan(arrays[0]) if np.isnan(bad) else arrays[0] == 0).all()


def test_scale_is_in_place():
    a = _r(4)
    expected = a * 0.25
    K.scale_(np, [a], 0.25)
    np.testing.assert_array_equal(a, expected)


def test_bucket_pack_and_unpack_round_trip_with_scale():
    arrays = [_r(2, 3), _r(4), _r(1, 1, 2)]
    flat = K.bucket_pack(np, arrays)
    np.testing.assert_array_equal(flat, np.concatenate([a.ravel() for a in arrays]))
    out = np.empty(12)
    assert K.bucket_pack(np, arrays, out) is out
    targets = [np.zeros_like(a) for a in arrays]
    K.bucket_unpack(np, flat * 4, targets, scale=0.25)
    for a, t in zip(arrays, targets):
        np.testing.assert_allclose(t, a, rtol=1e-15)
    with pytest.raises(ValueError, match="the arrays need"):
        K.bucket_pack(np, arrays, np.empty(11))
    with pytest.raises(ValueError, match="the arrays need"):
        K.bucket_unpack(np, flat[:-1], targets)


# ---- counter-based uniform random numbers ------------------------------------------------------------

_M64 = 2 ** 64 - 1


def _splitmix64_output(seed, counter):
    """Output `counter` (0-based) of SplitMix64 started in state mix64(seed), in Python integers."""
    def mix(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
        return z ^ (z >> 31)
    return mix((mix(seed & _M64) + (counter + 1) * 0x9E3779B97F4A7C15) & _M64)


def test_counter_uniform_is_splitmix64_bit_for_bit():
    # mix64(0) = 0, so seed 0 is the published SplitMix64 stream from state 0 (first output 0xE220A8397B1DCDAF)
    assert K.counter_uniform(np, (1,), np.float64, 0, 0)[0] == (0xE220A8397B1DCDAF >> 11) * 2.0 ** -53
    for seed, offset in [(0, 0), (12345, 678), (2 ** 64 - 1, 2 ** 64 - 3), (-5, 2 ** 40)]:  # the last two wrap
        got64 = K.counter_uniform(np, (2, 3), np.float64, seed, offset)
        got32 = K.counter_uniform(np, (2, 3), np.float32, seed, offset)
        bits = [_splitmix64_output(seed, (offset + i) & _M64) for i in range(6)]
        assert got64.dtype == np.float64 and got32.dtype == np.float32
        assert got64.ravel().tolist() == [(b >> 11) * 2.0 ** -53 for b in bits]
        assert got32.ravel().tolist() == [(b >> 40) * 2.0 ** -24 for b in bits]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counter_uniform_depends_on_seed_and_counter_only(dtype):
    first = K.counter_uniform(np, (4, 5), dtype, 7, 100)
    np.testing.assert_array_equal(K.counter_uniform(np, (4, 5), dtype, 7, 100), first)  # same (seed, offset)
    np.testing.assert_array_equal(K.counter_uniform(np, (20,), dtype, 7, 100), first.ravel())  # C order
    n_then_m = np.concatenate([K.counter_uniform(np, (13,), dtype, 7, 100),
                               K.counter_uniform(np, (7,), dtype, 7, 113)])
    np.testing.assert_array_equal(n_then_m, first.ravel())  # drawing n then m = drawing n + m
    assert not np.array_equal(K.counter_uniform(np, (4, 5), dtype, 8, 100), first)
    assert K.counter_uniform(np, (0, 3), dtype, 7, 100).shape == (0, 3)
    with pytest.raises(TypeError, match="float32 or float64"):
        K.counter_uniform(np, (2,), np.float16, 7, 100)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counter_uniform_is_uniform_on_the_unit_interval(dtype):
    n = 10 ** 6
    x = K.counter_uniform(np, (n,), dtype, 2024, 0)
    assert x.min() >= 0 and x.max() < 1
    # standard errors: of the mean sqrt(1/12 / n) = 2.9e-4, of the variance sqrt((1/80 - 1/144) / n) = 7.5e-5;
    # the bounds are 5 of them
    assert abs(x.mean(dtype=np.float64) - 0.5) < 1.5e-3
    assert abs(x.var(dtype=np.float64) - 1 / 12) < 3.8e-4
    counts, _ = np.histogram(x, bins=100, range=(0, 1))
    expected = n / 100
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 180, chi2  # 99 degrees of freedom: P(chi2 > 180) ~ 1e-6


# ---- tanh GELU, softmax over the last axis -------------------------------------------------------------

def test_normal_cdf_is_accurate_to_a_few_ulps_down_the_left_tail():
    """Phi from the rational erf / erfc against Python's math.erfc, whose argument -x / sqrt 2 is rounded (up to
    x^2 / 2 ulps off: 1e-14 at x = -8), and the far tail against values from mpmath (50 digits); against
    mpmath over [-37.5, 12] the kernel is within 1.2e-15."""
    x = np.concatenate([np.linspace(-8.0, 9.0, 20001), [0.0, 1e-300, -1e-300]])
    expected = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
    np.testing.assert_allclose(K.normal_cdf(np, x), expected, rtol=1e-14, atol=0)
    far = {-20.0: 2.7536241186062337e-89, -37.5: 4.605353009581955e-308}
    for v, phi in far.items():
        assert K.normal_cdf(np, np.float64(v)) == pytest.approx(phi, rel=1e-12)
    np.testing.assert_array_equal(K.normal_cdf(np, np.array([np.inf, -np.inf, np.nan])), [1.0, 0.0, np.nan])
    assert K.normal_cdf(np, np.float32(0.5)).dtype == np.float32


def test_gelu_exact_form_matches_the_formula_and_finite_differences():
    x = np.random.default_rng(0).uniform(-6.0, 6.0, (7, 5))
    w = np.random.default_rng(1).standard_normal(x.shape)
    expected = np.vectorize(lambda v: v * 0.5 * math.erfc(-v / math.sqrt(2)))(x)
    np.testing.assert_allclose(K.gelu_erf_forward(np, x), expected, rtol=1e-14, atol=1e-300)
    numeric = _numeric_grad(lambda: float((K.gelu_erf_forward(np, x) * w).sum()), x)
    np.testing.assert_allclose(K.gelu_erf_backward(np, w, x), numeric, rtol=1e-6, atol=1e-8)


def test_gelu_matches_the_formula_and_finite_differences():
    x, w = _r(3, 4, scale=3.0), _r(3, 4)
    expected = np.vectorize(lambda v: 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))))(x)
    # atol: where tanh(u) is near -1, 1 + tanh(u) keeps few digits (math's and NumPy's tanh differ in an ulp)
    np.testing.assert_allclose(K.gelu_forward(np, x), expected, rtol=1e-14, atol=1e-15)
    numeric = _numeric_grad(lambda: float((K.gelu_forward(np, x) * w).sum()), x)
    np.testing.assert_allclose(K.gelu_backward(np, w, x), numeric, rtol=1e-6, atol=1e-8)
    assert K.gelu_forward(np, np.float64(1.5)).shape == ()   # 0-d in, 0-d out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("queries, keys", [(4, 4), (3, 5), (5, 3)])
def test_softmax_forward_matches_the_formula(causal, queries, keys):
    x = _r(2, queries, keys, scale=3.0)
    y = K.softmax_forward(np, x, causal)
    for b, i in np.ndindex(2, queries):
        kept = min(i + 1, keys) if causal else keys
        e = [math.exp(v) for v in x[b, i, :kept]]
        np.testing.assert_allclose(y[b, i], [v / sum(e) for v in e] + [0.0] * (keys - kept), rtol=1e-14)
    all_out = K.softmax_forward(np, np.full((2, 3), -np.inf), causal)
    assert not all_out.any()                                   # nothing to attend to: zeros, not NaN


def test_softmax_backward_matches_finite_differences():
    x, w = _r(2, 3, 5), _r(2, 3, 5)
    for causal in (False, True):
        y = K.softmax_forward(np, x, causal)
        numeric = _numeric_grad(lambda: float((K.softmax_forward(np, x, causal) * w).sum()), x)
        np.testing.assert_allclose(K.softmax_backward(np, w, y), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_the_formula_and_finite_differences(affine):
    x, w = _r(3, 5, scale=2.0) + 1, _r(3, 5)
    weight, bias = (_r(5), _r(5)) if affine else (None, None)
    y, mean, rstd = K.layer_norm_forward(np, x, weight, bias, 1e-5)
    for r in range(3):
        mu = sum(x[r]) / 5
        std = math.sqrt(sum((v - mu) ** 2 for v in x[r]) / 5 + 1e-5)
        expected = [(v - mu) / std * (weight[j] if affine else 1) + (bias[j] if affine else 0)
                    for j, v in enumerate(x[r])]
        np.testing.assert_allclose(y[r], expected, rtol=1e-13, atol=1e-14)
        assert mean[r] == pytest.approx(mu, rel=1e-14) and rstd[r] == pytest.approx(1 / std, rel=1e-14)

    def objective():
        return float((K.layer_norm_forward(np, x, weight, bias, 1e-5)[0] * w).sum())

    grad_x, grad_weight, grad_bias = K.layer_norm_backward(np, w, x, weight, mean, rstd, with_bias=affine)
    np.testing.assert_allclose(grad_x, _numeric_grad(objective, x), rtol=1e-6, atol=1e-8)
    if affine:
        np.testing.assert_allclose(grad_weight, _numeric_grad(objective, weight), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(grad_bias, _numeric_grad(objective, bias), rtol=1e-6, atol=1e-8)
    else:
        assert grad_weight is None and grad_bias is None
