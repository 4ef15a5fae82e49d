"""Cross-check against PyTorch in float64: forward values and the gradient of every input, for fixed
models, single ops with their options, random expression DAGs, and higher-order gradients."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import disttrain as dt
from disttrain.autograd import grad, ops
from autograd_testing import SETTINGS

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch

RTOL = 1e-10


def assert_close(ours, theirs, what=""):
    """rtol 1e-10, plus an atol of 1e-12 of the result's scale (different summation orders round differently)."""
    ours = ours.numpy() if isinstance(ours, dt.Tensor) else np.asarray(ours)
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs torch {theirs.shape}"
    scale = np.abs(theirs).max(initial=1.0) if np.isfinite(theirs).all() else 1.0
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=1e-12 * scale, err_msg=what)


# ---- one vocabulary, two libraries ---------------------------------------------------------------
def _dims(x, axis):
    return tuple(range(x.ndim)) if axis is None else axis


class Ours:
    tensor = staticmethod(lambda a, requires_grad=False: dt.tensor(a, dtype="float64", requires_grad=requires_grad))
    exp, log, tanh, sigmoid, relu, maximum, where = dt.exp, dt.log, dt.tanh, dt.sigmoid, dt.relu, dt.maximum, dt.where
    abs = staticmethod(lambda x: x.abs())
    clip = staticmethod(lambda x, lo, hi: x.clip(lo, hi))
    sum = staticmethod(lambda x, axis=None, keepdims=False: x.sum(axis, keepdims))
    mean = staticmethod(lambda x, axis=None, keepdims=False: x.mean(axis, keepdims))
    max = staticmethod(lambda x, axis=None, keepdims=False: x.amax(axis, keepdims))
    min = staticmethod(lambda x, axis=None, keepdims=False: x.amin(axis, keepdims))
    var = staticmethod(lambda x, axis=None, keepdims=False: x.var(axis, keepdims=keepdims, correction=0))
    transpose = staticmethod(lambda x, axes=None: x.permute(axes) if axes else x.T)
    reshape = staticmethod(lambda x, shape: x.reshape(shape))
    broadcast_to = staticmethod(lambda x, shape: x.broadcast_to(shape))
    concat = staticmethod(lambda xs, axis: dt.concat(xs, axis))
    stack = staticmethod(lambda xs, axis: dt.stack(xs, axis))
    split = staticmethod(lambda x, size, axis: dt.split(x, size, axis))
    softmax = staticmethod(lambda x, axis: ops.softmax(x, axis))
    log_softmax = staticmethod(lambda x, axis: ops.log_softmax(x, axis))
    cross_entropy = staticmethod(lambda x, t, ignore_index=-100, reduction="mean":
                                 ops.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction))
    mse_loss = staticmethod(lambda x, y, reduction="mean": ops.mse_loss(x, y, reduction=reduction))
    layer_norm = staticmethod(lambda x, shape, w=None, b=None: ops.layer_norm(x, shape, w, b))
    conv2d = staticmethod(lambda x, w, b=None, stride=1, padding=0: ops.conv2d(x, w, b, stride, padding))
    max_pool2d = staticmethod(lambda x, k, stride=None, padding=0: ops.max_pool2d(x, k, stride, padding))
    avg_pool2d = staticmethod(lambda x, k, stride=None, padding=0: ops.avg_pool2d(x, k, stride, padding))
    embedding = staticmethod(lambda idx, w: ops.embedding(idx, w))
    unfold = staticmethod(lambda x, k, stride=1, padding=0: ops.unfold(x, k, stride, padding))
    index = staticmethod(lambda a: dt.tensor(np.asarray(a)))
    flip = staticmethod(lambda x, axis: x[(slice(None),) * (axis % x.ndim) + (slice(None, None, -1),)])
    gelu = staticmethod(lambda x, approximate="tanh": ops.gelu(x, approximate=approximate))
    masked_softmax = staticmethod(lambda x, mask=None, causal=False: ops.masked_softmax(x, mask, causal))


class Torch:
    tensor = staticmethod(lambda a, requires_grad=False: torch.tensor(np.asarray(a), dtype=torch.float64,
                                                                      requires_grad=requires_grad))
    exp, log, tanh, sigmoid, relu, maximum = torch.exp, torch.log, torch.tanh, torch.sigmoid, torch.relu, torch.maximum
    where = staticmethod(torch.where)
    abs = staticmethod(torch.abs)
    clip = staticmethod(torch.clamp)
    sum = staticmethod(lambda x, axis=None, keepdims=False: x.sum(_dims(x, axis), keepdim=keepdims))
    mean = staticmethod(lambda x, axis=None, keepdims=False: x.mean(_dims(x, axis), keepdim=keepdims))
    max = staticmethod(lambda x, axis=None, keepdims=False: torch.amax(x, _dims(x, axis), keepdim=keepdims))
    min = staticmethod(lambda x, axis=None, keepdims=False: torch.amin(x, _dims(x, axis), keepdim=keepdims))
    var = staticmethod(lambda x, axis=None, keepdims=False: torch.var(x, _dims(x, axis), correction=0,
                                                                      keepdim=keepdims))
    transpose = staticmethod(lambda x, axes=None: x.permute(axes) if axes else x.permute(*reversed(range(x.ndim))))
    reshape = staticmethod(lambda x, shape: x.reshape(shape))
    broadcast_to = staticmethod(lambda x, shape: x.broadcast_to(shape))
    concat = staticmethod(lambda xs, axis: torch.cat(xs, axis))
    stack = staticmethod(lambda xs, axis: torch.stack(xs, axis))
    split = staticmethod(lambda x, size, axis: torch.split(x, size, axis))
    softmax = staticmethod(lambda x, axis: torch.softmax(x, axis))
    log_softmax = staticmethod(lambda x, axis: torch.log_softmax(x, axis))
    cross_entropy = staticmethod(lambda x, t, ignore_index=-100, reduction="mean":
                                 F.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction))
    mse_loss = staticmethod(lambda x, y, reduction="mean": F.mse_loss(x, y, reduction=reduction))
    layer_norm = staticmethod(lambda x, shape, w=None, b=None: F.layer_norm(
        x, (shape,) if isinstance(shape, int) else shape, w, b, eps=1e-5))
    conv2d = staticmethod(lambda x, w, b=None, stride=1, padding=0: F.conv2d(x, w, b, stride, padding))
    max_pool2d = staticmethod(lambda x, k, stride=None, padding=0: F.max_pool2d(x, k, stride, padding))
    avg_pool2d = staticmethod(lambda x, k, stride=None, padding=0: F.avg_pool2d(x, k, stride, padding))
    embedding = staticmethod(lambda idx, w: F.embedding(idx, w))
    unfold = staticmethod(lambda x, k, stride=1, padding=0: F.unfold(x, k, padding=padding, stride=stride))
    index = staticmethod(lambda a: torch.tensor(np.asarray(a)))
    flip = staticmethod(lambda x, axis: x.flip(axis))  # torch has no negative slice steps
    gelu = staticmethod(lambda x, approximate="tanh": F.gelu(x, approximate=approximate))

    @staticmethod
    def masked_softmax(x, mask=None, causal=False):
        keep = None
        if mask is not None and mask.dtype == torch.bool:
            keep = mask
        elif mask is not None:
            x = x + mask
        if causal:
            tri = torch.ones(x.shape[-2], x.shape[-1], dtype=torch.bool).tril()
            keep = tri if keep is None else keep & tri
        return torch.softmax(x if keep is None else x.masked_fill(~keep, float("-inf")), -1)


def run_both(model, arrays, constants=()):
    """Evaluate model(L, *inputs, *constants) in both libraries; compare the outputs and every input's gradient.

    `arrays` become float64 inputs requiring grad; `constants` are passed through L.index (int targets, indices).
    The scalar loss is the sum of every output weighted by fixed random numbers.
    """
    results = {}
    for lib in (Ours, Torch):
        inputs = [lib.tensor(a, requires_grad=True) for a in arrays]
        outputs = model(lib, *inputs, *[lib.index(c) for c in constants])
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        rng = np.random.default_rng(0)
        loss = 0.0
        for o in outputs:
            loss = loss + (o * lib.tensor(rng.standard_normal(tuple(o.shape)))).sum()
        loss.backward()
        results[lib] = (outputs, [x.grad for x in inputs])
    (ours_out, ours_grads), (torch_out, torch_grads) = results[Ours], results[Torch]
    for k, (a, b) in enumerate(zip(ours_out, torch_out)):
        assert_close(a, b, f"output {k}")
    for k, (a, b) in enumerate(zip(ours_grads, torch_grads)):
        assert (a is None) == (b is None), f"input {k}: gradient presence differs"
        if a is not None:
            assert_close(a, b, f"gradient of input {k}")


def _rand(*shape, seed=0, low=-1.0, high=1.0):
    return np.random.default_rng(seed + len(shape) * 7 + sum(shape)).uniform(low, high, size=shape)


# ---- whole models -------------------------------------------------------------------------------
def test_mlp_with_layer_norm_dropout_free_and_cross_entropy():
    def model(L, x, w1, b1, w2, b2, g, target):
        h = L.tanh(x @ w1 + b1)
        h = L.layer_norm(h, 5, g)
        logits = L.relu(h) @ w2 + b2
        return L.cross_entropy(logits, target, ignore_index=1), L.log_softmax(logits, -1)

    run_both(model, [_rand(4, 3), _rand(3, 5), _rand(5), _rand(5, 3), _rand(3), _rand(5, low=0.5, high=1.5)],
             [np.array([0, 1, 2, 2])])


def test_conv_net():
    def model(L, x, w1, b1, w2, wl, target):
        h = L.relu(L.conv2d(x, w1, b1, stride=1, padding=1))           # (2, 3, 6, 5)
        h = L.max_pool2d(h, 2, 2, 1)                                      # (2, 3, 4, 3)
        h = L.tanh(L.conv2d(h, w2, None, stride=(2, 1), padding=(0, 1)))  # (2, 2, 2, 3)
        h = L.avg_pool2d(h, (1, 2), 1)                                    # (2, 2, 2, 2)
        logits = L.reshape(h, (2, 8)) @ wl
        return L.cross_entropy(logits, target, reduction="sum")

    run_both(model, [_rand(2, 2, 6, 5), _rand(3, 2, 3, 3), _rand(3), _rand(2, 3, 2, 3), _rand(8, 4)],
             [np.array([3, 0])])


def test_attention_block():
    def model(L, x, wq, wk, wv):
        q, k, v = x @ wq, x @ wk, x @ wv                                  # (2, 5, 4)
        scores = q @ L.transpose(k, (0, 2, 1)) * (1 / np.sqrt(4.0))      # (2, 5, 5)
        attn = L.softmax(scores, -1)
        out = attn @ v
        return L.mean(L.var(out, -1, True) + L.max(out, 1, True), None), out

    run_both(model, [_rand(2, 5, 3), _rand(3, 4), _rand(3, 4, seed=1), _rand(3, 4, seed=2)])


def test_embedding_lm_step():
    def model(L, emb, w, tokens, target):
        h = L.embedding(tokens, emb)                                      # (2, 3, 4)
        logits = L.transpose(L.tanh(h) @ w, (0, 2, 1))                   # (2, 5, 3): (N, C, d)
        return [L.cross_entropy(logits, target, reduction=r) for r in ("mean", "sum", "none")]

    run_both(model, [_rand(5, 4), _rand(4, 5)], [np.array([[1, 1, 4], [0, 1, 1]]), np.array([[2, -100, 0], [4, 4, 1]])])


def test_causal_multi_head_attention_against_scaled_dot_product_attention():
    """4-D batched matmuls and the causal softmax against torch's fused attention."""
    def model(L, q, k, v):
        if L is Torch:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        scores = q @ L.transpose(k, (0, 1, 3, 2)) * (1 / np.sqrt(4.0))  # (B, H, T, T)
        return L.masked_softmax(scores, causal=True) @ v

    run_both(model, [_rand(2, 3, 5, 4), _rand(2, 3, 5, 4, seed=1), _rand(2, 3, 5, 4, seed=2)])


@pytest.mark.parametrize("shapes", [((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 4)), ((2, 4, 3), (2, 6, 3), (2, 6, 5)),
                                    ((6, 2), (3, 2), (3, 4))], ids=["BHTE", "L<S", "L>S"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_scaled_dot_product_attention(shapes, causal, scale):
    """The fused op (no mask, no dropout), torch's is_causal triangle included where L != S."""
    def model(L, q, k, v):
        sdpa = F.scaled_dot_product_attention if L is Torch else dt.nn.functional.scaled_dot_product_attention
        return sdpa(q, k, v, is_causal=causal, scale=scale)

    run_both(model, [_rand(*shape, seed=i, low=-2, high=2) for i, shape in enumerate(shapes)])


def test_scaled_dot_product_attention_with_masks():
    """The composed path: a boolean keep mask and an additive one, broadcast over the batch."""
    rng = np.random.default_rng(4)
    keep = rng.random((4, 5)) < 0.6
    keep[:, 0] = True
    additive = np.where(keep, rng.uniform(-1, 1, (4, 5)), -np.inf)

    def model(L, q, k, v, keep, additive):
        sdpa = F.scaled_dot_product_attention if L is Torch else dt.nn.functional.scaled_dot_product_attention
        if L is Torch:
            additive = additive.to(torch.float64)
        return [sdpa(q, k, v, attn_mask=keep), sdpa(q, k, v, attn_mask=additive)]

    run_both(model, [_rand(2, 4, 3), _rand(2, 5, 3, seed=1), _rand(2, 5, 2, seed=2)], [keep, additive])


# ---- single ops with their options ----------------------------------------------------------------
def test_gelu_tanh_form():
    run_both(lambda L, x: [L.gelu(x), L.gelu(x * 5.0)], [_rand(3, 4, 2)])


def test_gelu_exact_form():
    run_both(lambda L, x: [L.gelu(x, "none"), L.gelu(x * 5.0, "none")], [_rand(3, 4, 2)])


@pytest.mark.parametrize("causal", [False, True])
def test_masked_softmax_with_boolean_and_additive_masks(causal):
    rng = np.random.default_rng(3)
    keep = rng.random((2, 1, 4, 4)) < 0.7
    keep[..., 0] = True  # every row keeps an entry (torch gives NaN for an empty row, ours zeros)
    additive = np.where(rng.random((4, 4)) < 0.7, rng.uniform(-2, 2, (4, 4)), -np.inf)
    additive[:, 0] = 0.0

    def model(L, x, keep, additive):
        return [L.masked_softmax(x * 3.0, keep, causal), L.masked_softmax(x, additive, causal)]

    run_both(model, [_rand(2, 3, 4, 4)], [keep, additive])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2), (2, 4, 2, 3)], ids=["NC", "NCd", "NCd1d2"])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy(reduction, shape, ignore_index):
    rng = np.random.default_rng(sum(shape))
    target = rng.integers(0, shape[1], size=(shape[0],) + shape[2:])
    target.reshape(-1)[1::4] = ignore_index
    run_both(lambda L, x, t: L.cross_entropy(x * 3.0, t, ignore_index, reduction), [_rand(*shape)], [target])


@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2), (2, 0, 1)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions(axis, keepdims):
    def model(L, x):
        return [getattr(L, name)(x, axis, keepdims) for name in ("sum", "mean", "max", "min", "var")]

    run_both(model, [_rand(3, 4, 2)])


def test_reductions_with_ties():
    def model(L, x):
        return [L.max(x, 1), L.min(x, None), L.max(L.relu(x), 0), L.maximum(L.relu(x), L.relu(-x))]

    run_both(model, [np.array([[1.0, 3.0, 3.0], [-2.0, -2.0, 0.0]])])


@pytest.mark.parametrize("kernel, stride, padding", [(2, 1, 0), ((3, 2), (2, 1), (1, 0)), (3, 2, 1)])
def test_conv_pool_unfold(kernel, stride, padding):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel

    def model(L, x, w, b):
        return [L.conv2d(x, w, b, stride, padding), L.max_pool2d(x, kernel, stride, padding),
                L.avg_pool2d(x, kernel, stride, padding), L.unfold(x, kernel, stride, padding)]

    run_both(model, [_rand(2, 3, 6, 5), _rand(4, 3, kh, kw), _rand(4)])


def test_shape_ops():
    def model(L, x, y):
        parts = L.split(x, 2, 1)                                           # (3, 2, 4), (3, 2, 4), (3, 1, 4)
        c = L.concat([parts[2], y, parts[0]], 1)                           # (3, 4, 4)
        s = L.stack([c, L.transpose(c, (0, 2, 1))], 0)                     # (2, 3, 4, 4)
        return [L.flip(s[1], 0)[:, None, 1:], L.flip(s, -1)[..., ::2], L.broadcast_to(L.reshape(x, (1, 60)), (2, 60)),
                x[np.array([0, 2, 0]), :, np.array([1, 1, 3])], L.clip(x, -0.5, 0.5),
                L.where(x > 0, x * 2.0, L.reshape(y, (3, 1, 4)) ** 2)]

    run_both(model, [_rand(3, 5, 4), _rand(3, 1, 4)])


def test_mse_and_pow():
    def model(L, x, y):
        return [L.mse_loss(x, y), L.mse_loss(x, y, "sum"), L.abs(x) ** y, 2.0 ** x, x ** 3, L.exp(x) / (y + 2.0)]

    run_both(model, [_rand(3, 4), _rand(3, 4, low=0.5, high=2.0)])


# ---- random expression DAGs ---------------------------------------------------------------------
# Every op maps tensors of shapes in {(3, 4), (1, 4), (3, 1), (1, 1)} to one of them, so any two
# nodes broadcast together; operands are drawn from all nodes so far, so intermediates feed several ops.
UNARY = {
    "neg": lambda L, a: -a,
    "tanh": lambda L, a: L.tanh(a),
    "sigmoid": lambda L, a: L.sigmoid(a),
    "exp_tanh": lambda L, a: L.exp(L.tanh(a)),
    "log": lambda L, a: L.log(a * a + 0.5),
    "relu": lambda L, a: L.relu(a),
    "abs": lambda L, a: L.abs(a),
    "square": lambda L, a: a ** 2,
    "sqrt": lambda L, a: (a * a + 1.0) ** 0.5,
    "clip": lambda L, a: L.clip(a, -0.4, 0.6),
    "softmax": lambda L, a: L.softmax(a, -1),
    "log_softmax": lambda L, a: L.log_softmax(a, 0),
    "sum0": lambda L, a: L.sum(a, 0, True),
    "mean1": lambda L, a: L.mean(a, 1, True),
    "max1": lambda L, a: L.max(a, -1, True),
    "min0": lambda L, a: L.min(a, 0, True),
    "var1": lambda L, a: L.var(a, 1, True),
    "flip": lambda L, a: L.flip(L.flip(a, 0), 1),
    "transpose_reshape": lambda L, a: L.reshape(L.transpose(a), tuple(a.shape)),
    "gather": lambda L, a: a[L.index(np.array([2, 0, 2]) % a.shape[0])],
}
BINARY = {
    "add": lambda L, a, b: a + b,
    "sub": lambda L, a, b: a - b,
    "mul": lambda L, a, b: a * b,
    "div": lambda L, a, b: a / (b * b + 1.0),
    "maximum": lambda L, a, b: L.maximum(a, b),
    "where": lambda L, a, b: L.where(a > b, a, b * 0.5),
    "concat_slice": lambda L, a, b: L.concat([L.broadcast_to(a, (3, 4)), L.broadcast_to(b, (3, 4))], 1)[:, 2:6],
    "matmul": lambda L, a, b: L.broadcast_to(a, (3, 4)) @ L.transpose(L.broadcast_to(b, (3, 4))) @ L.tanh(
        L.broadcast_to(a, (3, 4))),
    "stack_mean": lambda L, a, b: L.mean(L.stack([L.broadcast_to(a, (3, 4)), L.broadcast_to(b, (3, 4))], 0), 0),
}
OPS = sorted(UNARY) + sorted(BINARY)
steps = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 63), st.integers(0, 63)), min_size=1, max_size=10)


def random_dag(plan):
    def model(L, *inputs):
        nodes = list(inputs)
        for name, i, j in plan:
            a, b = nodes[i % len(nodes)], nodes[j % len(nodes)]
            nodes.append(UNARY[name](L, a) if name in UNARY else BINARY[name](L, a, b))
        return nodes[len(inputs):]

    return model


@settings(SETTINGS, max_examples=100)
@given(steps, st.integers(0, 2**32 - 1))
def test_random_expression_dags(plan, seed):
    rng = np.random.default_rng(seed)
    inputs = [rng.uniform(-1.5, 1.5, size=s) for s in [(3, 4), (1, 4), (3, 1)]]
    run_both(random_dag(plan), inputs)


@settings(SETTINGS, max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(["add", "sub", "mul", "tanh", "sum0", "where"]), st.integers(0, 63),
                          st.integers(0, 63)), min_size=1, max_size=12), st.integers(0, 2**32 - 1))
def test_random_dags_of_same_shape_arithmetic(plan, seed):
    """Inputs of one shape: add and sub hand the same gradient tensor to several slots, the case where
    the engine's in-place accumulation into gradient buffers must not leak from one slot to another."""
    rng = np.random.default_rng(seed)
    run_both(random_dag(plan), [rng.uniform(-1.5, 1.5, size=(3, 4)) for _ in range(3)])


@pytest.mark.parametrize("name", OPS)
def test_every_dag_op_on_shared_intermediates(name):
    """Each op once, on operands that are intermediates feeding several ops (the DAG test may skip some)."""
    plan = [("tanh", 0, 0), ("mul", 3, 1), (name, 4, 3), (name, 3, 2), ("add", 5, 6), ("sub", 4, 7)]
    rng = np.random.default_rng(1)
    run_both(random_dag(plan), [rng.uniform(-1.5, 1.5, size=s) for s in [(3, 4), (1, 4), (3, 1)]])


def test_random_dag_harness_detects_a_difference():
    """The harness must be able to fail: a model that differs between the libraries is caught."""
    def model(L, x):
        return L.tanh(x) * (1.0 if L is Ours else 1.0 + 1e-9)

    with pytest.raises(AssertionError):
        run_both(model, [_rand(3, 4)])


# ---- higher order -------------------------------------------------------------------------------
def test_hessian_vector_product_matches_torch():
    rng = np.random.default_rng(0)
    a, x0, v = rng.standard_normal((4, 4)), rng.standard_normal(4), rng.standard_normal(4)

    def f(L, x):
        h = L.tanh(L.tensor(a) @ x)
        return (h * x).sum() + (x ** 3).sum() * 0.1 + L.log_softmax(h * x, 0).sum()

    x = dt.tensor(x0, requires_grad=True)
    (g,) = grad(f(Ours, x), [x], create_graph=True)
    (hv,) = grad((g * dt.tensor(v)).sum(), [x])
    _, expected = torch.autograd.functional.hvp(lambda t: f(Torch, t), torch.tensor(x0), torch.tensor(v))
    assert_close(hv, expected, "Hessian-vector product")


def test_double_backward_gradient_penalty_through_a_conv_net():
    """d/dw of |d loss / d x|^2 for conv2d + layer_norm + cross_entropy, against torch."""
    def penalty(L, x, w, g, target):
        h = L.tanh(L.conv2d(x, w, None, 1, 1))                             # (2, 2, 3, 3)
        logits = L.layer_norm(L.reshape(h, (2, 18)), 18, g)[:, :5]
        loss = L.cross_entropy(logits, target)
        return loss, h

    results = {}
    for lib in (Ours, Torch):
        x, w, g = (lib.tensor(_rand(2, 1, 3, 3), True), lib.tensor(_rand(2, 1, 3, 3, seed=1), True),
                   lib.tensor(_rand(18, low=0.5, high=1.5), True))
        loss, _ = penalty(lib, x, w, g, lib.index(np.array([1, 4])))
        if lib is Ours:
            (gx,) = grad(loss, [x], create_graph=True)
        else:
            (gx,) = torch.autograd.grad(loss, [x], create_graph=True)
        (gx * gx).sum().backward()
        results[lib] = (gx, w.grad, g.grad, x.grad)
    for k, (a, b) in enumerate(zip(results[Ours], results[Torch])):
        assert_close(a, b, f"result {k}")
