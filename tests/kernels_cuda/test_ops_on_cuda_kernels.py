"""Every op on the CUDA kernels equals the same op on the NumPy kernels, forward and backward.

Each case builds the same expression from the same inputs twice, on the CPU's NumPy kernels and on
the CUDA kernels (the `cuda_kernels` fixture, conftest.py: the "cuda" device on a GPU, or in CI the
CPU backend with the CUDA wrappers over emulated kernels), seeds backward with the same random output
gradient and compares outputs and every input's gradient.
"""
import contextlib

import numpy as np
import pytest

import disttrain as dt
from disttrain import optim
from disttrain.autograd import ops
from disttrain.nn import functional as F
from disttrain.nn.utils import clip_grad_norm_

TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=1e-4, atol=1e-5)}


def _r(*shape, seed=0, positive=False):
    a = np.random.default_rng(seed).standard_normal(shape)
    return np.abs(a) + 0.5 if positive else a


def _scalar(out, seed):
    """sum(out * w) over every float output, so one backward covers all outputs."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    total = None
    for k, o in enumerate(outs):
        w = dt.tensor(_r(*o.shape, seed=100 + seed + k) if o.shape else np.float64(1.3), dtype=o.dtype,
                      device=o.device)
        term = (o * w).sum()
        total = term if total is None else total + term
    return total


def _runs(cuda_kernels):
    """(device, context) of the reference run on the NumPy kernels, then of the run on the CUDA kernels."""
    return [("cpu", contextlib.nullcontext), cuda_kernels]


def check(cuda_kernels, fn, *arrays, dtype="float64", grad=True):
    results = []
    for device, context in _runs(cuda_kernels):
        with context():
            inputs = [dt.tensor(a, dtype=dtype, device=device, requires_grad=grad) for a in arrays]
            out = fn(*inputs)
            values = [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
            grads = []
            if grad:
                _scalar(out, 0).backward()
                grads = [None if t.grad is None else t.grad.numpy() for t in inputs]
        results.append((values, grads))
    (vc, gc), (vg, gg) = results
    for a, b in zip(vg, vc):
        np.testing.assert_allclose(a, b, **TOL[dtype])
    for k, (a, b) in enumerate(zip(gg, gc)):
        assert (a is None) == (b is None), f"input {k}"
        if a is not None:
            np.testing.assert_allclose(a, b, **TOL[dtype], err_msg=f"gradient of input {k}")


class POS:
    """A shape whose values must be positive (log, division, a power's base)."""

    def __init__(self, *shape):
        self.shape = shape


ELEMENTWISE = {
    "add": (lambda a, b: a + b, [(3, 4), (4,)]), "sub": (lambda a, b: a - b, [(3, 4), (3, 1)]),
    "mul": (lambda a, b: a * b, [(3, 4), (3, 4)]), "div": (lambda a, b: a / b, [(3, 4), POS(4,)]),
    "neg": (lambda a: -a, [(5,)]), "pow": (lambda a: a ** 3, [(5,)]),
    "pow_tensor": (lambda a, b: a ** b, [POS(5,), (5,)]),
    "exp": (lambda a: a.exp(), [(5,)]), "log": (lambda a: a.log(), [POS(5,)]),
    "tanh": (lambda a: a.tanh(), [(2, 3)]), "sigmoid": (lambda a: a.sigmoid(), [(2, 3)]),
    "relu": (lambda a: a.relu(), [(2, 3)]), "abs": (lambda a: a.abs(), [(2, 3)]),
    "gelu": (lambda a: F.gelu(a), [(2, 3)]),
    "maximum": (lambda a, b: dt.maximum(a, b), [(3, 4), (4,)]),
    "where": (lambda a, b: dt.where(a > 0, a, b), [(3, 4), (3, 4)]),
    "clip": (lambda a: a.clip(-0.5, 0.5), [(10,)]),
}
REDUCE_SHAPE = {
    "sum": (lambda a: a.sum(axis=1), [(3, 4, 5)]), "mean": (lambda a: a.mean(axis=(0, 2), keepdims=True), [(3, 4, 5)]),
    "var": (lambda a: a.var(axis=0), [(6, 2)]), "max": (lambda a: a.max(axis=1).values, [(3, 7)]),
    "amax": (lambda a: a.amax(axis=1), [(3, 7)]),
    "min": (lambda a: a.min(), [(3, 7)]), "reshape": (lambda a: a.reshape(6, 2), [(3, 4)]),
    "permute": (lambda a: a.permute(2, 0, 1), [(2, 3, 4)]), "transpose": (lambda a: a.transpose(0, -1), [(2, 3, 4)]),
    "T": (lambda a: a.T, [(2, 3)]),
    "broadcast_to": (lambda a: a.broadcast_to((3, 2, 4)), [(2, 1)]),
    "getitem_basic": (lambda a: a[1:, ::2], [(4, 5)]),
    "getitem_rows": (lambda a: a[dt.tensor(np.array([0, 2, 2, -1]), device=a.device)], [(4, 5)]),
    "getitem_pairs": (lambda a: a[dt.tensor(np.array([0, 1, 1]), device=a.device),
                                  dt.tensor(np.array([2, 0, 2]), device=a.device)], [(3, 4)]),
    "concat": (lambda a, b: dt.concat([a, b], axis=1), [(2, 3), (2, 1)]),
    "stack": (lambda a, b: dt.stack([a, b], axis=0), [(2, 3), (2, 3)]),
    "split": (lambda a: dt.split(a, [2, 3], axis=1), [(2, 5)]),
    "unbind": (lambda a: ops.unbind(a, 0), [(3, 2)]),
    "cast": (lambda a: a.to(dtype="float32").to(dtype="float64"), [(3,)]),
    "to_device": (lambda a: (a.cpu() * 2).to(a.device), [(3,)]),
}
LINALG_NN = {
    "matmul": (lambda a, b: a @ b, [(3, 4), (4, 5)]), "matmul_batched": (lambda a, b: a @ b, [(2, 3, 4), (4, 2)]),
    "matmul_vec": (lambda a, b: a @ b, [(4,), (4, 3)]),
    "linear": (lambda x, w, b: F.linear(x, w, b), [(5, 4), (3, 4), (3,)]),
    "matmul_4d": (lambda a, b: a @ b, [(2, 3, 5, 4), (2, 3, 4, 5)]),
    "causal_softmax": (lambda a: ops.masked_softmax(a, causal=True), [(2, 3, 5, 5)]),
    "softmax": (lambda a: F.softmax(a, dim=1), [(4, 6)]), "log_softmax": (lambda a: F.log_softmax(a, dim=0), [(4, 6)]),
    "mse": (lambda a, b: F.mse_loss(a, b), [(3, 4), (3, 4)]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, 6, w, b), [(4, 6), (6,), (6,)]),
    "dropout_p0": (lambda a: F.dropout(a, 0.0), [(3, 3)]),
    "conv2d": (lambda x, w, b: ops.conv2d(x, w, b, stride=1, padding=1), [(2, 3, 6, 6), (4, 3, 3, 3), (4,)]),
    "max_pool2d": (lambda x: ops.max_pool2d(x, 2), [(2, 3, 6, 6)]),
    "avg_pool2d": (lambda x: ops.avg_pool2d(x, 3, stride=2, padding=1), [(2, 3, 7, 7)]),
    "lstm_cell": (lambda g, h, c, w: ops.lstm_cell(g, h, c, w), [(3, 20), (3, 5), (3, 5), (20, 5)]),
}


def _arrays(specs):
    return [_r(*s.shape, seed=k, positive=True) if isinstance(s, POS) else _r(*s, seed=k) for k, s in enumerate(specs)]


@pytest.mark.parametrize("name", sorted({**ELEMENTWISE, **REDUCE_SHAPE, **LINALG_NN}))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_op_matches_cpu(cuda_kernels, name, dtype):
    fn, specs = {**ELEMENTWISE, **REDUCE_SHAPE, **LINALG_NN}[name]
    check(cuda_kernels, fn, *_arrays(specs), dtype=dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n, c", [(6, 5), (40, 10_000)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cross_entropy_matches_cpu(cuda_kernels, reduction, n, c, dtype):
    target = np.random.default_rng(0).integers(0, c, n)
    target[1] = -100

    def fn(logits):
        return F.cross_entropy(logits, dt.tensor(target, device=logits.device), reduction=reduction)

    check(cuda_kernels, fn, _r(n, c) * 3, dtype=dtype)


def test_cross_entropy_with_class_axis_and_retained_graph(cuda_kernels):
    target = np.random.default_rng(0).integers(0, 4, (2, 3))
    grads = []
    for device, context in _runs(cuda_kernels):
        with context():
            logits = dt.tensor(_r(2, 4, 3), device=device, requires_grad=True)
            loss = F.cross_entropy(logits, dt.tensor(target, device=device))
            loss.backward(retain_graph=True)
            loss.backward()  # second pass: recomputes what the first consumed
            grads.append(logits.grad.numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-10)


def test_embedding_matches_cpu(cuda_kernels):
    idx = np.array([[0, 3, 3], [9, 0, 3]])
    check(cuda_kernels, lambda w: F.embedding(dt.tensor(idx, device=w.device), w), _r(10, 4))
    check(cuda_kernels, lambda w: F.embedding(dt.tensor(idx, device=w.device), w), _r(10, 4), dtype="float32")


def test_create_graph_through_the_fused_ops(cuda_kernels):
    """Second-order gradients (the composed fallback paths) agree between the kernels."""
    results = []
    for device, context in _runs(cuda_kernels):
        with context():
            x = dt.tensor(_r(3, 20), device=device, requires_grad=True)
            h = dt.tensor(_r(3, 5, seed=1), device=device, requires_grad=True)
            w = dt.tensor(_r(20, 5, seed=2) * 0.3, device=device, requires_grad=True)
            hn, cn = ops.lstm_cell(x, h, h, w)
            loss = F.cross_entropy(hn, dt.tensor(np.array([0, 4, 2]), device=device)) + (cn * cn).sum()
            (gx,) = dt.grad([loss], [x], create_graph=True)
            (gx * gx).sum().backward()
            results.append((gx.numpy(), w.grad.numpy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def _optimizer_steps(kind, device):
    params = [dt.tensor(_r(4, 3, seed=k), device=device, requires_grad=True) for k in range(3)]
    opt = {"sgd": lambda: optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
           "sgd_nesterov": lambda: optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
           "adam": lambda: optim.Adam(params, lr=1e-2, weight_decay=1e-2),
           "adamw_amsgrad": lambda: optim.AdamW(params, lr=1e-2, amsgrad=True)}[kind]()
    norms = []
    for step in range(4):
        opt.zero_grad()
        loss = sum(((p * p * (k + 1)).sum() for k, p in enumerate(params)), dt.zeros((), dtype="float64",
                                                                                   device=device))
        loss.backward()
        norms.append(float(clip_grad_norm_(params, 2.0)))
        opt.step()
    return [p.numpy() for p in params], norms


@pytest.mark.parametrize("kind", ["sgd", "sgd_nesterov", "adam", "adamw_amsgrad"])
def test_optimizers_and_clipping_match_cpu(cuda_kernels, kind):
    finals = []
    for device, context in _runs(cuda_kernels):
        with context():
            finals.append(_optimizer_steps(kind, device))
    (pc, nc), (pg, ng) = finals
    np.testing.assert_allclose(ng, nc, rtol=1e-10)
    for a, b in zip(pg, pc):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
