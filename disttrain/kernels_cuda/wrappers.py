"""The CUDA backend's fused kernels, with the names and signatures of disttrain.tensor.kernels_numpy.

CudaBackend.kernels is this module, so an op calls `self.backend.kernels.f(self.xp, ...)` and gets
our CUDA kernel on the GPU and the NumPy reference on the CPU. Each wrapper makes its inputs
C-contiguous, allocates the outputs, picks the launch configuration (launch_config.py) and launches the
kernel (loader.py). GEMMs stay on cuBLAS through CuPy's matmul.

Where no kernel applies (a dtype other than float32/float64, empty arrays, a non-contiguous
buffer that must be updated in place, a norm order the kernels do not compute) the wrapper falls
back to the NumPy reference run on CuPy arrays: it is written against `xp`, so it is correct there
too, only not fused.

NOTE: no wrapper reads a device value on the host, so none of them syncs the GPU, and a training
step built from them can be captured in a CUDA graph (disttrain.train.cuda_graph).
"""
import numpy as np

from disttrain.kernels_cuda import launch_config
from disttrain.kernels_cuda.loader import SUFFIX, kernel
from disttrain.tensor import kernels_numpy as _ref

ACTIVATIONS = _ref.ACTIVATIONS  # index = the kernels' DT_ACT_* code
adam_scalars = _ref.adam_scalars  # host arithmetic, shared
add_bias_ = _ref.add_bias_          # one broadcast add: CuPy's own elementwise kernel is all it takes
NORM_SUM_SQ, NORM_MAX_ABS, NORM_SUM_POW = 0, 1, 2  # norms.cu DT_NORM_*
_i64, _i32, _f64, _u64 = np.int64, np.int32, np.float64, np.uint64


def _fused(*arrays):
    """True when every array has a dtype the kernels are compiled for and none is empty or 0-d."""
    return all(a.dtype in SUFFIX and a.size > 0 and a.ndim > 0 for a in arrays)


def _contiguous(xp, a):
    return xp.ascontiguousarray(a)


def _launch_1d(source, name, dtype, n, args):
    grid, block = launch_config.elementwise_config(n)
    kernel(source, name, dtype)(grid, block, args)


# ---- elementwise ---------------------------------------------------------------------------------------

def sigmoid(xp, a):
    if not _fused(a):
        return _ref.sigmoid(xp, a)
    return bias_act_forward(xp, a, None, "sigmoid")


def bias_act_forward(xp, x, bias, act):
    """y = act(x + bias) in one kernel: x (..., C), bias (C,) or None."""
    _ref.check_activation(act)
    if not _fused(x) or (bias is not None and bias.shape != x.shape[-1:]):
        return _ref.bias_act_forward(xp, x, bias, act)
    x = _contiguous(xp, x)
    n_cols = x.shape[-1]
    n_rows = x.size // n_cols
    y = xp.empty_like(x)
    b = _contiguous(xp, bias) if bias is not None else x  # not read without a bias
    grid, block = launch_config.rows_config(n_rows, n_cols)
    kernel("elementwise", "bias_act_forward", x.dtype)(
        grid, block, (x, b, y, _i64(n_rows), _i64(n_cols), _i32(ACTIVATIONS.index(act)), _i32(bias is not None)))
    return y


def bias_act_backward(xp, grad_y, y, act, with_bias=False):
    """(grad_x, grad_bias): grad_x = grad_y * act'(y) in one kernel; grad_bias a column sum (CuPy)."""
    _ref.check_activation(act)
    if not _fused(grad_y, y) or grad_y.shape != y.shape:
        return _ref.bias_act_backward(xp, grad_y, y, act, with_bias)
    grad_y, y = _contiguous(xp, grad_y), _contiguous(xp, y)
    grad_x = xp.empty_like(y)
    _launch_1d("elementwise", "bias_act_backward", y.dtype, y.size,
               (grad_y, y, grad_x, _i64(y.size), _i32(ACTIVATIONS.index(act))))
    return grad_x, (grad_x.reshape(-1, y.shape[-1]).sum(axis=0) if with_bias else None)


# ---- LSTM cell ---------------------------------------------------------------------------------------------

def lstm_cell_forward(xp, gates_x, h, c, w_hh):
    """One LSTM step: h @ W_hh^T on cuBLAS, then one fused kernel (see kernels_numpy for the layout)."""
    if not _fused(gates_x, h, c, w_hh):
        return _ref.lstm_cell_forward(xp, gates_x, h, c, w_hh)
    batch, hidden = h.shape
    h_new, c_new, tanh_c = (xp.empty((batch, hidden), dtype=c.dtype) for _ in range(3))
    acts = xp.empty((batch, 4 * hidden), dtype=c.dtype)
    _lstm_step_forward(xp, _contiguous(xp, gates_x), h, _contiguous(xp, c), w_hh, h_new, c_new, acts, tanh_c)
    return h_new, c_new, acts, tanh_c


def lstm_cell_backward(xp, dh, dc, acts, tanh_c, h, c, w_hh):
    """Gradients of one LSTM step: one fused kernel for d_pre and dc_prev, then two cuBLAS GEMMs."""
    if not _fused(dh, dc, acts, tanh_c, h, c, w_hh):
        return _ref.lstm_cell_backward(xp, dh, dc, acts, tanh_c, h, c, w_hh)
    dh, dc, acts, tanh_c, c = (_contiguous(xp, a) for a in (dh, dc, acts, tanh_c, c))
    d_pre = xp.empty_like(acts)
    dc_prev = _lstm_step_backward(xp, dh, dc, acts, tanh_c, c, d_pre)
    return d_pre, d_pre @ w_hh, dc_prev, d_pre.T @ h


def lstm_layer_forward(xp, gates_x, h0, c0, w_hh):
    """T steps of the fused cell kernel (each after its h @ W_hh^T on cuBLAS), written into (T, B, *) buffers."""
    if not _fused(gates_x, h0, c0, w_hh):
        return _ref.lstm_layer_forward(xp, gates_x, h0, c0, w_hh)
    steps, batch, four_h = gates_x.shape
    gates_x = _contiguous(xp, gates_x)
    out, cs, tanh_c = (xp.empty((steps, batch, four_h // 4), dtype=gates_x.dtype) for _ in range(3))
    acts = xp.empty_like(gates_x)
    h, c = h0, _contiguous(xp, c0)
    for t in range(steps):
        _lstm_step_forward(xp, gates_x[t], h, c, w_hh, out[t], cs[t], acts[t], tanh_c[t])
        h, c = out[t], cs[t]
    return out, cs, acts, tanh_c


def lstm_layer_backward(xp, d_out, dh_n, dc_n, acts, tanh_c, out, cs, h0, c0, w_hh):
    """T steps of the fused cell backward kernel (each followed by the dh GEMM), then dW_hh as one GEMM."""
    if not _fused(d_out, dh_n, dc_n, acts, tanh_c, out, cs, h0, c0, w_hh):
        return _ref.lstm_layer_backward(xp, d_out, dh_n, dc_n, acts, tanh_c, out, cs, h0, c0, w_hh)
    d_out, acts, tanh_c, cs, c0 = (_contiguous(xp, a) for a in (d_out, acts, tanh_c, cs, c0))
    d_gates = xp.empty_like(acts)
    dh, dc = dh_n, _contiguous(xp, dc_n)
    for t in reversed(range(acts.shape[0])):
        dc = _lstm_step_backward(xp, d_out[t] + dh, dc, acts[t], tanh_c[t], cs[t - 1] if t else c0, d_gates[t])
        dh = d_gates[t] @ w_hh
    four_h, hidden = w_hh.shape
    h_prev = xp.concatenate([h0[None], out[:-1]])
    return d_gates, dh, dc, d_gates.reshape(-1, four_h).T @ h_prev.reshape(-1, hidden)


def _lstm_step_forward(xp, gates_x, h, c, w_hh, h_new, c_new, acts, tanh_c):
    """The fused forward kernel on C-contiguous gates_x, c and outputs (views into layer buffers are)."""
    batch, hidden = c.shape
    grid, block = launch_config.rows_config(batch, hidden)
    kernel("lstm", "lstm_cell_forward", c.dtype)(
        grid, block, (gates_x, h @ w_hh.T, c, h_new, c_new, acts, tanh_c, _i64(batch), _i64(hidden)))


def _lstm_step_backward(xp, dh, dc, acts, tanh_c, c, d_pre):
    """The fused backward kernel: writes d_pre (B, 4H), returns dc_prev (B, H); inputs C-contiguous."""
    batch, hidden = c.shape
    dc_prev = xp.empty((batch, hidden), dtype=c.dtype)
    grid, block = launch_config.rows_config(batch, hidden)
    kernel("lstm", "lstm_cell_backward", c.dtype)(
        grid, block, (dh, dc, acts, tanh_c, c, d_pre, dc_prev, _i64(batch), _i64(hidden)))
    return dc_prev


# ---- cross-entropy ---------------------------------------------------------------------------------------

def cross_entropy_forward(xp, logits, target, ignore_index, keep_softmax=False):
    """(losses (N,), lse (N,)): one online log-sum-exp pass per row. `keep_softmax` is ignored: backward
    recomputes exp from lse in its own single pass, so no (N, C) array is kept."""
    if not _fused(logits) or logits.ndim != 2:
        return _ref.cross_entropy_forward(xp, logits, target, ignore_index, keep_softmax)
    n_rows, n_cols = logits.shape
    logits = _contiguous(xp, logits)
    target = _contiguous(xp, target.astype(np.int64, copy=False))
    losses = xp.empty(n_rows, dtype=logits.dtype)
    lse = xp.empty(n_rows, dtype=logits.dtype)
    cfg = launch_config.softmax_config(n_rows, n_cols, logits.itemsize)
    kernel("xent", f"xent_forward_{cfg.kind}", logits.dtype)(
        cfg.grid, cfg.block, (logits, target, losses, lse, _i64(n_rows), _i64(n_cols), _i64(ignore_index)),
        shared_mem=cfg.shared_mem)
    return losses, lse


def cross_entropy_backward(xp, logits, target, saved, row_scale):
    """(softmax - onehot) * row_scale in one elementwise pass from forward's lse (recomputed when None)."""
    if not _fused(logits) or logits.ndim != 2 or isinstance(saved, tuple):  # tuple: the reference's form
        return _ref.cross_entropy_backward(xp, logits, target, saved, row_scale)
    n_rows, n_cols = logits.shape
    logits = _contiguous(xp, logits)
    target = _contiguous(xp, target.astype(np.int64, copy=False))
    if saved is None:
        _, saved = cross_entropy_forward(xp, logits, target, -1)
    lse = _contiguous(xp, saved)
    scale = _contiguous(xp, xp.broadcast_to(row_scale.astype(logits.dtype, copy=False), (n_rows,)))
    grad = xp.empty_like(logits)
    grid, block = launch_config.rows_config(n_rows, n_cols)
    kernel("xent", "xent_backward", logits.dtype)(
        grid, block, (logits, target, lse, scale, grad, _i64(n_rows), _i64(n_cols)))
    return grad


# ---- embedding backward --------------------------------------------------------------------------------

def index_add_rows(xp, target, index, values):
    """target[index[r]] += values[r] with atomics, in place on a C-contiguous target (V, D)."""
    if (not _fused(target, values) or target.ndim != 2 or not target.flags.c_contiguous
            or values.shape != index.shape + target.shape[1:] or index.dtype.kind not in "iu"):
        return _ref.index_add_rows(xp, target, index, values)
    n_index, n_cols = index.size, target.shape[1]
    idx = _contiguous(xp, index.reshape(-1).astype(np.int64, copy=False))
    vals = _contiguous(xp, values.reshape(n_index, n_cols))
    grid, block = launch_config.rows_config(n_index, n_cols)
    kernel("embedding", "index_add_rows", target.dtype)(
        grid, block, (target, idx, vals, _i64(n_index), _i64(n_cols), _i64(target.shape[0])))


# ---- optimizers ------------------------------------------------------------------------------------------

def _updatable(*arrays):
    return _fused(*arrays) and all(a.flags.c_contiguous for a in arrays)


def sgd_step(xp, param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, maximize=False):
    """One fused SGD update in place; returns the momentum buffer (new at the first step)."""
    if not _updatable(param) or (momentum_buffer is not None and not _updatable(momentum_buffer)):
        return _ref.sgd_step(xp, param, grad, momentum_buffer, lr, momentum, dampening, weight_decay,
                             nesterov, maximize)
    t = param.dtype.type
    first = momentum != 0 and momentum_buffer is None
    if first:
        momentum_buffer = xp.empty_like(param)
    buf = momentum_buffer if momentum != 0 else param  # not read without momentum
    _launch_1d("optim", "sgd_step", param.dtype, param.size,
               (param, _contiguous(xp, grad.astype(param.dtype, copy=False)), buf, _i64(param.size), t(-lr),
                t(momentum), t(1 - dampening), t(weight_decay), _i32(momentum != 0), _i32(bool(nesterov)),
                _i32(bool(maximize)), _i32(first)))
    return momentum_buffer


def foreach_sgd_step(xp, params, grads, momentum_buffers, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                     nesterov=False, maximize=False):
    """sgd_step (one fused launch each) on every parameter of the list; returns their buffers."""
    _ref.check_list_lengths("foreach_sgd_step", params=params, grads=grads, momentum_buffers=momentum_buffers)
    return [sgd_step(xp, param, grad, buffer, lr, momentum, dampening, weight_decay, nesterov, maximize)
            for param, grad, buffer in zip(params, grads, momentum_buffers)]


def adam_step(xp, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps,
              weight_decay=0.0, decoupled=False, maximize=False):
    """One fused Adam/AdamW update in place (the bias corrections of `step` computed on the host)."""
    buffers = (param, exp_avg, exp_avg_sq) + ((max_exp_avg_sq,) if max_exp_avg_sq is not None else ())
    if not _updatable(*buffers):
        return _ref.adam_step(xp, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps,
                              weight_decay, decoupled, maximize)
    t = param.dtype.type
    step_size, bias_correction2_sqrt = adam_scalars(step, lr, beta1, beta2)
    amsgrad = max_exp_avg_sq is not None
    _launch_1d("optim", "adam_step", param.dtype, param.size,
               (param, _contiguous(xp, grad.astype(param.dtype, copy=False)), exp_avg, exp_avg_sq,
                max_exp_avg_sq if amsgrad else param, _i64(param.size), t(1 - beta1), t(beta2), t(1 - beta2),
                t(weight_decay), t(1 - lr * weight_decay), t(-step_size), t(bias_correction2_sqrt), t(eps),
                _i32(bool(decoupled)), _i32(amsgrad), _i32(bool(maximize))))


def foreach_adam_step(xp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
                      weight_decay=0.0, decoupled=False, maximize=False):
    """adam_step (one fused launch each) on every parameter of the list, each at its own step."""
    _ref.check_list_lengths("foreach_adam_step", params=params, grads=grads, exp_avgs=exp_avgs,
                            exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs, steps=steps)
    for args in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
        adam_step(xp, *args, lr, beta1, beta2, eps, weight_decay, decoupled, maximize)


# ---- gradient norms and clipping -------------------------------------------------------------------------

def _norm_mode(norm_type):
    p = float(norm_type)
    if p == float("inf"):
        return NORM_MAX_ABS
    if p == 2.0:
        return NORM_SUM_SQ
    if p > 0 and p != float("inf"):
        return NORM_SUM_POW
    return None  # 0, negative and -inf orders: the reference


def _accumulate_norm(xp, a, acc, mode, p):
    a = _contiguous(xp, a)
    grid, block = launch_config.reduction_config(a.size)
    kernel("norms", "norm_accumulate", a.dtype)(grid, block, (a, _i64(a.size), acc, _i32(mode), _f64(p)))


def _finalize_norms(xp, acc, mode, p):
    out = xp.empty_like(acc)
    grid, block = launch_config.elementwise_config(acc.size)
    kernel("norms", "norm_finalize")(grid, block, (acc, out, _i64(acc.size), _i32(mode), _f64(p)))
    return out


def norms(xp, arrays, norm_type):
    """Per-array norms (float64, on the device): one reduction launch per array, one to finish."""
    mode = _norm_mode(norm_type)
    if mode is None or not arrays or not _fused(*arrays):
        return _ref.norms(xp, arrays, norm_type)
    acc = xp.zeros(len(arrays), dtype=np.float64)
    for k, a in enumerate(arrays):
        _accumulate_norm(xp, a, acc[k:k + 1], mode, float(norm_type))
    return _finalize_norms(xp, acc, mode, float(norm_type))


def scale_(xp, arrays, coef):
    for a in arrays:
        if _updatable(a):
            _launch_1d("norms", "scale", a.dtype, a.size, (a, _i64(a.size), a.dtype.type(coef)))
        else:
            a *= coef


def clip_by_total_norm_(xp, arrays, max_norm, norm_type=2.0):
    """Total norm and the clipping decision both on the device: returns the 0-d float64 total norm."""
    mode = _norm_mode(norm_type)
    if mode is None or not arrays or not _updatable(*arrays):
        return _ref.clip_by_total_norm_(xp, arrays, max_norm, norm_type)
    acc = xp.zeros(1, dtype=np.float64)
    for a in arrays:
        _accumulate_norm(xp, a, acc, mode, float(norm_type))
    total = _finalize_norms(xp, acc, mode, float(norm_type))
    for a in arrays:
        _launch_1d("norms", "clip_scale", a.dtype, a.size, (a, _i64(a.size), total, _f64(max_norm)))
    return total.reshape(())


# ---- gradient buckets --------------------------------------------------------------------------------------

def _copy_scaled(src, dst, scale):
    _launch_1d("bucket", "copy_scaled", dst.dtype, dst.size,
               (src, dst, _i64(dst.size), dst.dtype.type(scale), _i32(scale != 1.0)))


def bucket_pack(xp, arrays, out=None):
    total = sum(a.size for a in arrays)
    if not arrays or not _fused(*arrays) or len({a.dtype for a in arrays}) != 1:
        return _ref.bucket_pack(xp, arrays, out)
    if out is None:
        out = xp.empty(total, dtype=arrays[0].dtype)
    elif out.shape != (total,):
        raise ValueError(f"bucket_pack: out has shape {out.shape}, the arrays need ({total},)")
    offset = 0
    for a in arrays:
        _copy_scaled(_contiguous(xp, a.astype(out.dtype, copy=False)), out[offset:offset + a.size], 1.0)
        offset += a.size
    return out


def bucket_unpack(xp, flat, arrays, scale=1.0):
    total = sum(a.size for a in arrays)
    if flat.shape != (total,):
        raise ValueError(f"bucket_unpack: flat has shape {flat.shape}, the arrays need ({total},)")
    offset = 0
    for a in arrays:
        part = flat[offset:offset + a.size]
        if _updatable(a, part) and a.dtype == flat.dtype:
            _copy_scaled(part, a, scale)
        else:
            a[...] = part.reshape(a.shape) * scale if scale != 1.0 else part.reshape(a.shape)
        offset += a.size


# ---- counter-based uniform random numbers ------------------------------------------------------------------

def counter_uniform(xp, shape, dtype, seed, offset):
    """Uniform [0, 1) samples of `shape`, sample i the hash of (seed, offset + i): bit for bit the reference."""
    out = xp.empty(tuple(shape), dtype=dtype)
    if not _fused(out):
        return _ref.counter_uniform(xp, shape, dtype, seed, offset)
    _launch_1d("random", "counter_uniform", out.dtype, out.size,
               (out, _i64(out.size), _u64(int(seed) & _ref.UINT64_MASK), _u64(int(offset) & _ref.UINT64_MASK)))
    return out


# ---- GELU (tanh form: the Transformer's; exact form), softmax over the last axis -------------------------

def gelu_forward(xp, x):
    """0.5 x (1 + tanh(u)) in one elementwise kernel (gelu.cu: written as x / (1 + exp(-2u)))."""
    return _gelu_pass(xp, "gelu_forward", _ref.gelu_forward, x)


def gelu_backward(xp, grad_y, x):
    """GELU's input gradient in one elementwise kernel, recomputing the activation from x."""
    return _gelu_backward_pass(xp, "gelu_backward", _ref.gelu_backward, grad_y, x)


def gelu_erf_forward(xp, x):
    """x Phi(x), the exact GELU, in one elementwise kernel (gelu.cu: Phi through erfc)."""
    return _gelu_pass(xp, "gelu_erf_forward", _ref.gelu_erf_forward, x)


def gelu_erf_backward(xp, grad_y, x):
    """The exact GELU's input gradient in one elementwise kernel, recomputing Phi(x) from x."""
    return _gelu_backward_pass(xp, "gelu_erf_backward", _ref.gelu_erf_backward, grad_y, x)


def _gelu_pass(xp, kernel, reference, x):
    """y = f(x) by gelu.cu's `kernel`, or by `reference` where no kernel applies."""
    if not _fused(x):
        return reference(xp, x)
    x = _contiguous(xp, x)
    y = xp.empty_like(x)
    _launch_1d("gelu", kernel, x.dtype, x.size, (x, y, _i64(x.size)))
    return y


def _gelu_backward_pass(xp, kernel, reference, grad_y, x):
    """grad_x from grad_y and the forward's input x by gelu.cu's `kernel`, or by `reference`."""
    operands = _backward_operands(xp, grad_y, x)
    if operands is None:
        return reference(xp, grad_y, x)
    _launch_1d("gelu", kernel, x.dtype, x.size, operands + (_i64(x.size),))
    return operands[2]


normal_cdf = _ref.normal_cdf  # the exact GELU's double backward only: CuPy's elementwise passes suffice


def _backward_operands(xp, grad_y, saved):
    """(grad_y, saved, a new grad_x), C-contiguous, for a backward kernel over same-shape arrays; None where
    no kernel applies (a dtype without one, mixed dtypes or shapes, empty or 0-d arrays)."""
    if not _fused(grad_y, saved) or grad_y.shape != saved.shape or grad_y.dtype != saved.dtype:
        return None
    saved = _contiguous(xp, saved)
    return _contiguous(xp, grad_y), saved, xp.empty_like(saved)


def _softmax_launch(name, rows, n, dtype, args):
    cfg = launch_config.softmax_config(rows, n, dtype.itemsize)
    kernel("softmax", f"{name}_{cfg.kind}", dtype)(cfg.grid, cfg.block, args, shared_mem=cfg.shared_mem)


def softmax_forward(xp, x, causal=False):
    """softmax over the last axis (causal: keys j <= query i) in one kernel: a warp or a block per row."""
    if not _fused(x) or (causal and x.ndim < 2):
        return _ref.softmax_forward(xp, x, causal)
    x = _contiguous(xp, x)
    y = xp.empty_like(x)
    n = x.shape[-1]
    queries = x.shape[-2] if causal else 1
    _softmax_launch("softmax_forward", x.size // n, n, x.dtype,
                    (x, y, _i64(x.size // n), _i64(n), _i64(queries), _i32(bool(causal))))
    return y


def softmax_backward(xp, grad_y, y):
    """y (grad_y - sum(grad_y y)) over the last axis in one kernel: each row's dot product, then its gradient."""
    operands = _backward_operands(xp, grad_y, y)
    if operands is None:
        return _ref.softmax_backward(xp, grad_y, y)
    n = y.shape[-1]
    _softmax_launch("softmax_backward", y.size // n, n, y.dtype, operands + (_i64(y.size // n), _i64(n)))
    return operands[2]


def layer_norm_forward(xp, x, weight, bias, eps):
    """(y, mean, rstd): LayerNorm over the rows of x (N, D) in one kernel, a warp per row."""
    affine = [a for a in (weight, bias) if a is not None]
    if not _fused(x, *affine) or x.ndim != 2 or any(a.dtype != x.dtype for a in affine):
        return _ref.layer_norm_forward(xp, x, weight, bias, eps)
    rows, n = x.shape
    x = _contiguous(xp, x)
    y = xp.empty_like(x)
    mean, rstd = xp.empty(rows, dtype=x.dtype), xp.empty(rows, dtype=x.dtype)
    grid, block = launch_config.warp_rows_config(rows)
    kernel("layer_norm", "layer_norm_forward", x.dtype)(
        grid, block, (x, x if weight is None else _contiguous(xp, weight), x if bias is None else _contiguous(xp, bias),
                      _f64(eps), y, mean, rstd, _i64(rows), _i64(n), _i32(weight is not None), _i32(bias is not None)))
    return y, mean, rstd


def layer_norm_backward(xp, grad_y, x, weight, mean, rstd, with_bias=False):
    """(grad_x, grad_weight, grad_bias): grad_x in one kernel (a warp per row), the weight and bias gradients
    as column sums in another (a thread per column)."""
    operands = _backward_operands(xp, grad_y, x)
    if (operands is None or x.ndim != 2 or not _fused(mean, rstd) or mean.dtype != x.dtype or rstd.dtype != x.dtype
            or (weight is not None and (not _fused(weight) or weight.dtype != x.dtype))):
        return _ref.layer_norm_backward(xp, grad_y, x, weight, mean, rstd, with_bias)
    grad_y, x, grad_x = operands
    rows, n = x.shape
    mean, rstd = _contiguous(xp, mean), _contiguous(xp, rstd)
    grid, block = launch_config.warp_rows_config(rows)
    kernel("layer_norm", "layer_norm_backward", x.dtype)(
        grid, block, (grad_y, x, x if weight is None else _contiguous(xp, weight), mean, rstd, grad_x, _i64(rows),
                      _i64(n), _i32(weight is not None)))
    grad_weight = xp.empty(n, dtype=x.dtype) if weight is not None else None
    grad_bias = xp.empty(n, dtype=x.dtype) if with_bias else None
    if grad_weight is not None or grad_bias is not None:
        _launch_1d("layer_norm", "layer_norm_param_grads", x.dtype, n,
                   (grad_y, x, mean, rstd, x if grad_weight is None else grad_weight,
                    x if grad_bias is None else grad_bias, _i64(rows), _i64(n), _i32(grad_weight is not None),
                    _i32(grad_bias is not None)))
    return grad_x, grad_weight, grad_bias


# ---- scaled dot-product attention --------------------------------------------------------------------------

def attention_forward(xp, q, k, v, scale, causal):
    """(out, probabilities): cuBLAS's batched GEMMs around softmax.cu's kernel; backward reads the probabilities
    (the CPU's kernels keep the row log-sum-exp instead and recompute them: no fused attention kernel here yet)."""
    if k.shape[-2] == 0:  # no keys: the reference's zeros
        return _ref.attention_forward(xp, q, k, v, scale, causal)
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2))
    scores *= scale
    p = softmax_forward(xp, scores, causal)
    return xp.matmul(p, v), p


def attention_backward(xp, grad_out, q, k, v, out, saved, scale, causal):
    """(dq, dk, dv) from forward's probabilities, softmax.cu's backward between cuBLAS's GEMMs."""
    if saved.ndim != q.ndim:  # a row log-sum-exp: the reference's own forward
        return _ref.attention_backward(xp, grad_out, q, k, v, out, saved, scale, causal)
    ds = softmax_backward(xp, xp.matmul(grad_out, xp.swapaxes(v, -1, -2)), saved)
    ds *= scale
    return xp.matmul(ds, k), xp.matmul(xp.swapaxes(ds, -1, -2), q), xp.matmul(xp.swapaxes(saved, -1, -2), grad_out)


# ---- Linear's forward ------------------------------------------------------------------------------------

linear_forward = _ref.linear_forward  # cuBLAS's GEMM through CuPy, then one broadcast add: no kernel of ours
