"""gradcheck of the Transformer's ops: GELU (tanh and exact forms), masked / causal softmax, batched (4-D) matmul;
their values and edge cases (fully masked rows, huge scores, bad masks)."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import disttrain as dt
from disttrain.autograd import ops
from autograd_testing import FEW, check, check_second_order, leaf, seeds, uniform


# ---- GELU ---------------------------------------------------------------------------------------
def gelu_tanh_reference(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_erf_reference(x):
    """x Phi(x) with Python's math.erfc, element by element."""
    return np.vectorize(lambda v: v * 0.5 * math.erfc(-v / math.sqrt(2)))(x)


def gelu_tanh(x):
    return ops.gelu(x, approximate="tanh")


@FEW
@given(st.lists(st.integers(1, 4), min_size=0, max_size=3), seeds)
def test_gelu_gradcheck_any_shape(shape, seed):
    x = uniform(np.random.default_rng(seed), tuple(shape), -4.0, 4.0)
    np.testing.assert_allclose(gelu_tanh(x).numpy(), gelu_tanh_reference(x.numpy()), rtol=1e-14, atol=1e-300)
    check(gelu_tanh, x)
    np.testing.assert_allclose(ops.gelu(x).numpy(), gelu_erf_reference(x.numpy()), rtol=1e-14, atol=1e-300)
    check(ops.gelu, x)


@pytest.mark.parametrize("gelu", [gelu_tanh, ops.gelu], ids=["tanh", "exact"])
def test_gelu_second_order_and_tails(gelu):
    check_second_order(gelu, uniform(np.random.default_rng(0), (3, 4), -3.0, 3.0))
    reference = gelu_tanh_reference if gelu is gelu_tanh else gelu_erf_reference
    x = leaf([-40.0, -6.0, 0.0, 6.0, 40.0])
    y = gelu(x)
    np.testing.assert_allclose(y.numpy(), [0.0, reference(-6.0), 0.0, reference(6.0), 40.0],
                               rtol=1e-14, atol=1e-30)
    y.sum().backward()
    assert np.isfinite(x.grad.numpy()).all() and x.grad.numpy()[-1] == 1.0 and x.grad.numpy()[0] == 0.0


def test_gelu_is_exact_by_default_and_names_a_bad_approximate():
    x = dt.randn(3, 2)
    assert ops.gelu(x).dtype == dt.float32 and dt.nn.functional.gelu(x).dtype == dt.float32
    np.testing.assert_allclose(dt.nn.functional.gelu(dt.tensor([1.0, -2.0], dtype="float64")).numpy(),
                               [0.8413447460685429, -0.04550026389635842], rtol=1e-15)  # x Phi(x)
    assert dt.nn.GELU().approximate == "none"
    for bad in ("erf", None):
        with pytest.raises(ValueError, match=rf"^gelu: approximate={bad!r} is not one of 'none' .* or 'tanh'$"):
            ops.gelu(x, approximate=bad)
        with pytest.raises(ValueError, match=rf"^GELU: approximate={bad!r} is not one of"):
            dt.nn.GELU(approximate=bad)


# ---- masked / causal softmax ---------------------------------------------------------------------
def causal(q, k):
    return np.tri(q, k, dtype=bool)


@pytest.mark.parametrize("shape", [(4, 4), (2, 3, 5, 5), (3, 2, 4)], ids=["TT", "BHTT", "BTqTk"])
def test_causal_softmax_gradcheck_and_values(shape):
    rng = np.random.default_rng(sum(shape))
    x = uniform(rng, shape, -3.0, 3.0)
    y = ops.masked_softmax(x, causal=True).numpy()
    keep = causal(shape[-2], shape[-1])
    z = np.where(keep, x.numpy(), -np.inf)
    expected = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(y, expected / expected.sum(-1, keepdims=True), rtol=1e-14)
    assert (y[..., ~keep] == 0).all()
    check(lambda x: ops.masked_softmax(x, causal=True), x)


@pytest.mark.parametrize("mask_shape", [(5,), (3, 5), (2, 1, 5), (2, 3, 5)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_broadcast_masks_gradcheck(mask_shape, kind):
    rng = np.random.default_rng(len(mask_shape))
    x = uniform(rng, (2, 3, 5), -3.0, 3.0)
    keep = rng.random(mask_shape) < 0.6
    keep[..., 0] = True  # every row keeps an entry
    mask = keep if kind == "bool" else np.where(keep, rng.uniform(-1, 1, mask_shape), -np.inf)
    y = ops.masked_softmax(x, mask).numpy()
    assert (y[np.broadcast_to(~keep, y.shape)] == 0).all()
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-14)
    check(lambda x: ops.masked_softmax(x, mask), x)
    check(lambda x: ops.masked_softmax(x, dt.tensor(mask), causal=True), x)  # a Tensor mask, with causal too


def test_a_row_with_every_entry_masked_is_zero_and_passes_no_gradient():
    x = uniform(np.random.default_rng(0), (3, 4), -1.0, 1.0)
    keep = np.array([[True, False, True, False], [False] * 4, [True] * 4])
    y = ops.masked_softmax(x, keep)
    np.testing.assert_array_equal(y.numpy()[1], 0.0)
    (y * dt.tensor(np.arange(12.0).reshape(3, 4))).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy()[1], 0.0)
    assert np.isfinite(x.grad.numpy()).all()
    check(lambda x: ops.masked_softmax(x, keep), x)


def test_masked_softmax_is_stable_and_equals_softmax_without_a_mask():
    x = leaf([[1000.0, 1001.0, -1000.0], [3.0, -2.0, 0.5]])
    y = ops.masked_softmax(x, np.array([True, True, False]))
    np.testing.assert_allclose(y.numpy().sum(-1), 1.0, rtol=1e-15)
    assert y.numpy()[0, 2] == 0.0
    np.testing.assert_array_equal(ops.masked_softmax(x).numpy(), ops.softmax(x).numpy())
    check_second_order(lambda x: ops.masked_softmax(x, causal=True), uniform(np.random.default_rng(1), (3, 3)))


def test_masked_softmax_refuses_bad_masks():
    x = dt.randn(2, 3)
    with pytest.raises(TypeError, match="mask must be boolean .* got dtype int64"):
        ops.masked_softmax(x, np.ones((2, 3), dtype=np.int64))
    with pytest.raises(dt.autograd.OpError, match="dtype mismatch float32 tensor vs float64 array"):
        ops.masked_softmax(x, np.zeros((2, 3)))
    with pytest.raises(dt.autograd.OpError, match=r"MaskedSoftmax: .*input shapes: \(2, 3\), \(4,\)"):
        ops.masked_softmax(x, np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="causal needs"):
        ops.masked_softmax(dt.randn(3), causal=True)


# ---- batched matmul, as attention uses it --------------------------------------------------------
@pytest.mark.parametrize("a_shape, b_shape", [((2, 3, 5, 4), (2, 3, 4, 5)), ((2, 3, 5, 5), (2, 3, 5, 4)),
                                              ((2, 1, 5, 4), (3, 4, 2)), ((5, 4), (2, 3, 4, 2))])
def test_batched_matmul_four_d(a_shape, b_shape):
    rng = np.random.default_rng(0)
    a, b = uniform(rng, a_shape), uniform(rng, b_shape)
    np.testing.assert_allclose((a @ b).numpy(), np.matmul(a.numpy(), b.numpy()), rtol=1e-14)
    check(lambda a, b: a @ b, a, b)


# ---- scaled dot-product attention ------------------------------------------------------------------
def attention_reference(q, k, v, scale, causal):
    scores = q @ np.swapaxes(k, -1, -2) * scale
    if causal:
        scores = np.where(np.tri(scores.shape[-2], scores.shape[-1], dtype=bool), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("q_shape, k_shape, v_shape", [((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 4)),
                                                       ((2, 4, 3), (2, 6, 3), (2, 6, 5)),   # L < S, E != Ev
                                                       ((6, 2), (3, 2), (3, 4))],           # L > S, no batch
                         ids=["BHTE", "L<S", "L>S"])
@pytest.mark.parametrize("causal", [False, True])
def test_scaled_dot_product_attention_gradcheck_and_values(q_shape, k_shape, v_shape, causal):
    rng = np.random.default_rng(len(q_shape) + causal)
    q, k, v = uniform(rng, q_shape, -2, 2), uniform(rng, k_shape, -2, 2), uniform(rng, v_shape)
    out = ops.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "ScaledDotProductAttention"  # the fused op
    scale = 1 / math.sqrt(q_shape[-1])
    np.testing.assert_allclose(out.numpy(), attention_reference(q.numpy(), k.numpy(), v.numpy(), scale, causal),
                               rtol=1e-13, atol=1e-15)
    check(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.7), q, k, v)


def test_scaled_dot_product_attention_of_strided_views():
    """q, k and v cut from one projection's rows, as the Transformer's attention takes them."""
    rng = np.random.default_rng(5)
    qkv = uniform(rng, (5, 2, 3, 2, 4), -2, 2)                       # (T, B, 3, H, E)

    def attention(qkv):
        q, k, v = ops.unbind(qkv.permute(2, 1, 3, 0, 4), 0)       # each (B, H, T, E), strided
        out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.permute(2, 0, 1, 3).reshape((5, 2, 8))
    q, k, v = np.moveaxis(qkv.numpy().transpose(2, 1, 3, 0, 4), 0, 0)
    expected = attention_reference(q, k, v, 0.5, True).transpose(2, 0, 1, 3).reshape(5, 2, 8)
    np.testing.assert_allclose(attention(qkv).numpy(), expected, rtol=1e-13, atol=1e-15)
    check(attention, qkv)


def test_scaled_dot_product_attention_second_order():
    rng = np.random.default_rng(6)
    q, k, v = uniform(rng, (2, 3, 2)), uniform(rng, (2, 4, 2)), uniform(rng, (2, 4, 3))
    for causal in (False, True):
        check_second_order(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=causal), q, k, v)


def test_scaled_dot_product_attention_fused_equals_composed():
    """With a mask that keeps everything (or the causal triangle as a mask), the composed path runs; it gives
    the fused op's values and gradients."""
    rng = np.random.default_rng(7)
    arrays = [rng.uniform(-2, 2, (2, 3, 5, 4)) for _ in range(3)]
    results = []
    for mask in (None, np.tri(5, 5, dtype=bool)):
        q, k, v = (leaf(a) for a in arrays)
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        (out * leaf(np.arange(out.numpy().size).reshape(out.shape) % 7, requires_grad=False)).sum().backward()
        results.append([out.numpy(), q.grad.numpy(), k.grad.numpy(), v.grad.numpy()])
    for fused, composed in zip(*results):
        np.testing.assert_allclose(fused, composed, rtol=1e-12, atol=1e-14)


def test_scaled_dot_product_attention_with_masks_dropout_and_broadcast_batches():
    rng = np.random.default_rng(8)
    q, k, v = uniform(rng, (2, 3, 4)), uniform(rng, (1, 5, 4)), uniform(rng, (1, 5, 2))   # k, v broadcast
    keep = rng.random((3, 5)) < 0.6
    keep[:, 0] = True
    additive = np.where(keep, rng.uniform(-1, 1, (3, 5)), -np.inf)
    for mask in (keep, additive):
        check(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v)
    dt.manual_seed(3)
    dropped = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert dropped.grad_fn is not None and type(dropped.grad_fn).__name__ != "ScaledDotProductAttention"
    assert not np.allclose(dropped.numpy(), ops.scaled_dot_product_attention(q, k, v).numpy())


def test_scaled_dot_product_attention_refuses_bad_arguments():
    q, k, v = dt.randn(2, 3, 4), dt.randn(2, 5, 4), dt.randn(2, 5, 6)
    with pytest.raises(ValueError, match="pass attn_mask or is_causal=True, not both"):
        ops.scaled_dot_product_attention(q, k, v, attn_mask=np.ones((3, 5), bool), is_causal=True)
    with pytest.raises(dt.autograd.OpError,
                       match=r"query \(2, 3, 4\), key \(2, 5, 3\) and value \(2, 5, 6\) do not fit"):
        ops.scaled_dot_product_attention(q, dt.randn(2, 5, 3), v)
    with pytest.raises(dt.autograd.OpError, match=r"key \(2, 5, 4\) and value \(2, 4, 6\)"):
        ops.scaled_dot_product_attention(q, k, dt.randn(2, 4, 6))
    with pytest.raises(dt.autograd.OpError, match=r"need \(\.\.\., rows, features\) shapes, got \(4,\)"):
        ops.scaled_dot_product_attention(dt.randn(4), k, v)
    with pytest.raises(dt.autograd.OpError, match="dtype mismatch"):
        ops.scaled_dot_product_attention(q, k, v.double())
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\), got 1.5"):
        ops.scaled_dot_product_attention(q, k, v, dropout_p=1.5)


def test_scaled_dot_product_attention_keeps_no_probabilities_for_backward():
    """What the fused op holds between forward and backward is O(L) per problem (a log-sum-exp per query), where
    the composed ops hold the (L, S) probabilities: with L = S = 256 and E = 4, 64x the inputs' rows."""
    from disttrain.checkpointing import MemoryMeter

    rng = np.random.default_rng(9)
    q, k, v = (uniform(rng, (2, 256, 4)) for _ in range(3))
    held = {}
    for fused in (True, False):
        with MemoryMeter() as meter:
            if fused:
                out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                out = ops.masked_softmax((q @ k.swapaxes(-1, -2)) * 0.5, causal=True) @ v
            held[fused] = meter.live_bytes - meter.start_bytes
            out.sum().backward()
    probabilities = 2 * 256 * 256 * 8
    assert held[False] >= probabilities, held
    assert held[True] < probabilities / 8, held


def test_scaled_dot_product_attention_with_no_queries_or_no_keys():
    """No queries: an empty output. No keys: nothing to attend to, zeros (torch's answer), and zero gradients."""
    for queries, keys in ((0, 3), (3, 0)):
        q, k, v = dt.randn(2, queries, 4, requires_grad=True), dt.randn(2, keys, 4, requires_grad=True), \
            dt.randn(2, keys, 5, requires_grad=True)
        for causal in (False, True):
            out = ops.scaled_dot_product_attention(q, k, v, is_causal=causal)
            assert out.shape == (2, queries, 5) and not out.numpy().any()
            out.sum().backward()
            assert q.grad.shape == q.shape and not q.grad.numpy().any()
            assert k.grad.shape == k.shape and v.grad.shape == v.shape
            q.grad = k.grad = v.grad = None
