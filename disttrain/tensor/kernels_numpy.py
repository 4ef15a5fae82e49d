"""Fused kernels written with the array module: the CPU implementation and the reference that
every CUDA kernel in disttrain/kernels_cuda is tested against.

Each function takes and returns raw arrays (xp = numpy or cupy) and documents its layout. Passes over
big NumPy arrays run their row blocks side by side on the intra-op threads (disttrain.tensor.threads).
"""
import contextlib

import numpy as np

from disttrain.tensor.threads import one_blas_thread, parallel_rows


def _by_rows(xp, fn, rows, elements_per_row):
    """fn(lo, hi) over row blocks: side by side on the intra-op threads for NumPy arrays, one call otherwise."""
    if xp is np:
        parallel_rows(fn, rows, elements_per_row)
    else:
        fn(0, rows)


def _by_elements(xp, fn, *arrays):
    """fn(*blocks) over contiguous element ranges of same-shape C-contiguous NumPy arrays (None passed as
    None), side by side on the intra-op threads; one call fn(*arrays) otherwise. fn must be elementwise."""
    first = arrays[0]
    if xp is not np or any(a is not None and (a.shape != first.shape or not a.flags.c_contiguous) for a in arrays):
        fn(*arrays)
        return
    flat = [None if a is None else a.reshape(-1) for a in arrays]

    def block(lo, hi):
        fn(*(None if a is None else a[lo:hi] for a in flat))

    parallel_rows(block, first.size, 1)


def _small_gemms(xp):
    """Around a loop of small GEMMs (the recurrence's (B, H) x (H, 4H)): the BLAS on one thread for NumPy.
    Handing a 3-MFLOP GEMM to a second thread gains next to nothing on a quiet machine but, when another
    process holds that core, each hand-off waits for the scheduler, many times the GEMM itself
    (benchmarks/RESULTS.md)."""
    return one_blas_thread() if xp is np else contextlib.nullcontext()


def add_bias_(xp, out, bias):
    """out (N, C) += bias (C,) in place (Linear's forward after its GEMM)."""
    def rows(lo, hi):
        out[lo:hi] += bias

    _by_rows(xp, rows, out.shape[0], out.shape[1])


def sigmoid(xp, a):
    e = xp.exp(-xp.abs(a))  # exp of a non-positive number only: no overflow
    return xp.where(a >= 0, 1 / (1 + e), e / (1 + e)).astype(a.dtype, copy=False)


# ---- LSTM: one step, one layer -------------------------------------------------------------------------

def _gate_scales(xp, hidden, dtype):
    """(alpha, beta), each (4H,): tanh(alpha * pre) * alpha + beta is the activation of every gate.

    sigmoid(x) = tanh(x / 2) / 2 + 1/2 for i, f, o (alpha = beta = 1/2) and tanh for g (alpha = 1,
    beta = 0): one tanh over the whole contiguous (B, 4H) block instead of slices and exp, and
    halving is exact in binary floating point, so alpha folds into W_hh and gates_x exactly.
    """
    alpha = xp.full(4 * hidden, 0.5, dtype=dtype)
    alpha[2 * hidden:3 * hidden] = 1
    beta = alpha.copy()
    beta[2 * hidden:3 * hidden] = 0
    return alpha, beta


def _lstm_activate(xp, pre, c, h_out, c_out, tanh_c_out, alpha, beta):
    """The pointwise part of a step, from the scaled pre-activations pre = alpha * (gates_x + h W_hh^T)
    (B, 4H), which become the activations [i, f, g, o] in place; writes h_out, c_out, tanh_c_out (B, H)."""
    hidden = c.shape[1]
    xp.tanh(pre, out=pre)
    pre *= alpha
    pre += beta
    i, f, g, o = (pre[:, k * hidden:(k + 1) * hidden] for k in range(4))
    xp.multiply(f, c, out=c_out)
    c_out += i * g
    xp.tanh(c_out, out=tanh_c_out)
    xp.multiply(o, tanh_c_out, out=h_out)


def lstm_cell_forward(xp, gates_x, h, c, w_hh):
    """One LSTM step.

    gates_x (B, 4H): input projection x_t @ W_ih^T + b_ih + b_hh, gate order i, f, g, o (PyTorch's)
    h, c (B, H): previous hidden and cell state;  w_hh (4H, H)
    Returns h_new, c_new (B, H) and the activations backward needs: acts (B, 4H) = [i, f, g, o], tanh_c (B, H).
    The same arithmetic as one step of lstm_layer_forward.
    """
    alpha, beta = _gate_scales(xp, h.shape[1], gates_x.dtype)
    acts = gates_x * alpha
    acts += h @ (w_hh * alpha[:, None]).T
    h_new, c_new, tanh_c = (xp.empty_like(c) for _ in range(3))
    _lstm_activate(xp, acts, c, h_new, c_new, tanh_c, alpha, beta)
    return h_new, c_new, acts, tanh_c


def lstm_cell_backward(xp, dh, dc, acts, tanh_c, h, c, w_hh):
    """Gradients of one LSTM step: returns d_gates_x (B, 4H), dh_prev, dc_prev (B, H), dw_hh (4H, H)."""
    factors, dh_to_dc = _lstm_backward_factors(xp, acts[None], tanh_c[None], c[None])
    d_pre = xp.empty_like(acts)
    dc_prev = _lstm_step_backward(xp, dh, dc, factors[0], dh_to_dc[0], acts, d_pre)
    return d_pre, d_pre @ w_hh, dc_prev, d_pre.T @ h


def lstm_layer_forward(xp, gates_x, h0, c0, w_hh):
    """T LSTM steps: one layer over a sequence.

    gates_x (T, B, 4H): the input projection of every step (as lstm_cell_forward's); it is CONSUMED:
    its buffer is overwritten with the activations, so the caller passes an array it owns.
    h0, c0 (B, H): the initial state;  w_hh (4H, H).
    Returns out (T, B, H) = h_1..h_T, cs (T, B, H) = c_1..c_T, acts (T, B, 4H) = [i, f, g, o] per
    step (gates_x's buffer) and tanh_c (T, B, H): what lstm_layer_backward reads.
    """
    steps, batch, four_h = gates_x.shape
    alpha, beta = _gate_scales(xp, four_h // 4, gates_x.dtype)
    gates_x *= alpha
    # (H, 4H): h @ it = alpha * (h @ W_hh^T), exactly. Copied contiguous, not a transposed view: one-thread
    # OpenBLAS runs the small GEMM markedly faster on it (benchmarks/RESULTS.md)
    w_scaled_t = xp.ascontiguousarray((w_hh * alpha[:, None]).T)
    out, cs, tanh_c = (xp.empty((steps,) + h0.shape, dtype=gates_x.dtype) for _ in range(3))
    recurrent = xp.empty((batch, four_h), dtype=gates_x.dtype)
    h, c = h0, c0
    with _small_gemms(xp):
        for t in range(steps):
            pre = gates_x[t]
            xp.matmul(h, w_scaled_t, out=recurrent)
            pre += recurrent
            _lstm_activate(xp, pre, c, out[t], cs[t], tanh_c[t], alpha, beta)
            h, c = out[t], cs[t]
    return out, cs, gates_x, tanh_c


def lstm_layer_backward(xp, d_out, dh_n, dc_n, acts, tanh_c, out, cs, h0, c0, w_hh):
    """Gradients of lstm_layer_forward.

    d_out (T, B, H): the gradient of out; dh_n, dc_n (B, H): of the final state h_T, c_T (added to
    what reaches them through out). acts, tanh_c, out, cs: forward's; h0, c0 (B, H); w_hh (4H, H).
    Returns d_gates (T, B, 4H) (the gradient of gates_x), dh0, dc0 (B, H) and dw_hh (4H, H).
    Everything but the recurrence is vectorised over the T steps: the per-step factors before the
    loop, dw_hh = sum_t d_gates_t^T h_{t-1} as one GEMM after it.
    """
    steps = acts.shape[0]
    c_prev = xp.concatenate([c0[None], cs[:-1]])
    factors, dh_to_dc = _lstm_backward_factors(xp, acts, tanh_c, c_prev)
    d_gates = xp.empty_like(acts)
    dh_step = xp.empty_like(dh_n)
    dh, dc = dh_n, dc_n
    with _small_gemms(xp):
        for t in reversed(range(steps)):
            xp.add(d_out[t], dh, out=dh_step)
            dc = _lstm_step_backward(xp, dh_step, dc, factors[t], dh_to_dc[t], acts[t], d_gates[t])
            dh = d_gates[t] @ w_hh
    return d_gates, dh, dc, recurrent_weight_grad(xp, d_gates, h0, out)


def recurrent_weight_grad(xp, d_gates, h0, out):
    """dW_hh (4H, H) = sum_t d_gates_t^T h_{t-1} over all T steps as one GEMM (h_{-1} = h0)."""
    four_h, hidden = d_gates.shape[2], h0.shape[1]
    h_prev = xp.concatenate([h0[None], out[:-1]])
    return d_gates.reshape(-1, four_h).T @ h_prev.reshape(-1, hidden)


def _lstm_backward_factors(xp, acts, tanh_c, c_prev):
    """What d pre depends on besides the incoming gradients, for all T steps at once.

    acts (T, B, 4H), tanh_c, c_prev (T, B, H). Returns factors (T, B, 4, H) and dh_to_dc (T, B, H):
        dc_total = dc + dh * dh_to_dc                      dh_to_dc = o (1 - tanh_c^2)
        d pre_[i, f, g] = dc_total * factors[:, :, :3]     [g i (1-i), c_prev f (1-f), i (1-g^2)]
        d pre_o = dh * factors[:, :, 3]                     tanh_c o (1-o)
    """
    steps, batch, four_h = acts.shape
    hidden = four_h // 4
    gates = acts.reshape(steps, batch, 4, hidden)
    i, f, g, o = (gates[:, :, k] for k in range(4))
    factors = xp.subtract(1, gates)
    factors *= gates                           # s (1 - s): right for i, f, o
    xp.multiply(g, g, out=factors[:, :, 2])
    xp.subtract(1, factors[:, :, 2], out=factors[:, :, 2])  # 1 - g^2 for the tanh gate
    factors[:, :, 0] *= g
    factors[:, :, 1] *= c_prev
    factors[:, :, 2] *= i
    factors[:, :, 3] *= tanh_c
    dh_to_dc = tanh_c * tanh_c
    xp.subtract(1, dh_to_dc, out=dh_to_dc)
    dh_to_dc *= o
    return factors, dh_to_dc


def _lstm_step_backward(xp, dh, dc, factors, dh_to_dc, acts, d_pre):
    """One step of the recurrence: writes d_pre (B, 4H), returns dc_prev (B, H); see _lstm_backward_factors."""
    batch, four_h = acts.shape
    hidden = four_h // 4
    dc_total = dh * dh_to_dc
    dc_total += dc
    d_pre4 = d_pre.reshape(batch, 4, hidden)
    xp.multiply(factors[:, :3], dc_total[:, None, :], out=d_pre4[:, :3])
    xp.multiply(factors[:, 3], dh, out=d_pre4[:, 3])
    return dc_total * acts[:, hidden:2 * hidden]


# ---- fused log-softmax + cross-entropy ---------------------------------------------------------------

def cross_entropy_forward(xp, logits, target, ignore_index, keep_softmax=False):
    """Per-row -log softmax(logits)[target]: logits (N, C) float, target (N,) int, rows whose target is
    ignore_index give 0. Classes must be in [0, C) elsewhere (the op checks).

    Returns (losses (N,), saved): `saved` is what cross_entropy_backward reads. Here it is the pair
    (exp (N, C), sumexp (N,)) of the row-shifted exponentials and their row sums when keep_softmax
    (backward then normalises and scales exp in place in one pass: no second exp pass), else None.
    The CUDA kernel returns the row log-sum-exp (N,) instead and recomputes exp in backward's single
    pass; cross_entropy_backward below accepts all three forms.
    """
    n, classes = logits.shape
    valid = target != ignore_index
    safe = xp.where(valid, target, 0)
    exp = xp.empty_like(logits)
    shifted_target = xp.empty(n, dtype=logits.dtype)
    sumexp = xp.empty(n, dtype=logits.dtype)

    def rows(lo, hi):
        block = exp[lo:hi]
        xp.subtract(logits[lo:hi], logits[lo:hi].max(axis=1, keepdims=True), out=block)  # exp of <= 0: no overflow
        shifted_target[lo:hi] = block[xp.arange(hi - lo), safe[lo:hi]]
        xp.exp(block, out=block)
        # row sums: einsum's unrolled loop is faster than sum(axis=1) and, unlike a GEMV, adds each row the same
        # way whichever block the row is in (BLAS kernels treat a block's tail rows apart)
        xp.einsum("ij->i", block, out=sumexp[lo:hi])

    _by_rows(xp, rows, n, classes)
    losses = (xp.log(sumexp) - shifted_target) * valid
    return losses, ((exp, sumexp) if keep_softmax else None)


def cross_entropy_backward(xp, logits, target, saved, row_scale):
    """grad (N, C) = (softmax(logits) - onehot(target)) * row_scale[:, None].

    target (N,): a class in [0, C) for every row (rows with row_scale 0, e.g. ignored ones, may hold
    any class); row_scale (N,): d loss / d loss_row. `saved`: forward's (exp, sumexp) pair, whose exp
    is overwritten with the result; the row log-sum-exp (N,); or None (the softmax is recomputed).
    """
    n = logits.shape[0]
    row_scale = row_scale.reshape(n)
    if saved is None:
        saved = cross_entropy_forward(xp, logits, target, -1, keep_softmax=True)[1]
    if isinstance(saved, tuple):
        grad, sumexp = saved
        scale = (row_scale / sumexp)[:, None]

        def rows(lo, hi):
            grad[lo:hi] *= scale[lo:hi]

        _by_rows(xp, rows, n, grad.shape[1])
    else:
        grad = xp.exp(logits - saved[:, None])
        grad *= row_scale[:, None]
    grad[xp.arange(n), target] -= row_scale
    return grad


# ---- embedding backward (scatter-add) ----------------------------------------------------------------

def index_add_rows(xp, target, index, values):
    """target[index[r]] += values[r] in place, repeated indices accumulating.

    target (V, D); index int array of any shape; values index.shape + (D,).
    Sorted by row, each row's values are summed by one reduceat and added once: about half the
    time of ufunc.at (where the array module has reduceat; ufunc.at otherwise).
    """
    rows = index.reshape(-1)
    values = values.reshape(rows.shape + target.shape[1:])
    if rows.shape[0] < 2 or not hasattr(xp.add, "reduceat"):
        xp.add.at(target, rows, values)
        return
    n_rows = target.shape[0]
    rows = xp.where((rows < 0) & (rows >= -n_rows), rows + n_rows, rows)  # -1 and V-1 are one key
    order = xp.argsort(rows, kind="stable")
    rows = rows[order]
    starts = xp.flatnonzero(xp.concatenate([xp.ones(1, dtype=bool), rows[1:] != rows[:-1]]))
    target[rows[starts]] += xp.add.reduceat(values[order], starts, axis=0)  # out of range: IndexError


# ---- fused elementwise chains ------------------------------------------------------------------------

ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid")  # codes 0..3, as common.cuh DT_ACT_*

# Public functions that are not kernels: shared by the other kernel tables (kernels_cpu, kernels_cuda), which
# need not offer them; every other public function here is a kernel every table offers.
HELPERS = ("check_activation", "check_gelu_approximate", "check_list_lengths", "recurrent_weight_grad")


def check_activation(act):
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def bias_act_forward(xp, x, bias, act):
    """y = act(x + bias): x (..., C), bias (C,) or None, act one of ACTIVATIONS. Returns a new array."""
    check_activation(act)
    z = x + bias if bias is not None else x.copy()
    if act == "relu":
        return xp.where(z > 0, z, 0).astype(z.dtype, copy=False)  # NaN -> 0, as the kernel's x > 0 ? x : 0
    if act == "tanh":
        return xp.tanh(z)
    if act == "sigmoid":
        return sigmoid(xp, z)
    return z


def bias_act_backward(xp, grad_y, y, act, with_bias=False):
    """(grad_x, grad_bias) of y = act(x + bias), from forward's output y; grad_bias (C,) or None."""
    check_activation(act)
    if act == "relu":
        grad_x = grad_y * (y > 0)
    elif act == "tanh":
        grad_x = grad_y * (1 - y * y)
    elif act == "sigmoid":
        grad_x = grad_y * (y * (1 - y))
    else:
        grad_x = grad_y.copy()
    grad_x = grad_x.astype(y.dtype, copy=False)
    return grad_x, (grad_x.reshape(-1, y.shape[-1]).sum(axis=0) if with_bias else None)


# ---- fused optimizer updates -------------------------------------------------------------------------

def sgd_step(xp, param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, maximize=False):
    """One SGD update of `param` in place (torch's semantics; see disttrain.optim.sgd).

    momentum_buffer: the buffer of earlier steps, or None at the first step. Returns the buffer
    (a new array at the first step, updated in place later; None without momentum). `grad` is
    never modified. Element blocks run side by side on the intra-op threads.
    """
    first = momentum != 0 and momentum_buffer is None
    if first:
        # a new array: `grad` may be the parameter's own .grad array, which the caller may change later
        momentum_buffer = xp.empty_like(grad)

    def update(param, grad, buffer):
        if maximize:
            grad = -grad
        if weight_decay != 0:
            grad = grad + weight_decay * param
        if momentum != 0:
            if first:
                buffer[...] = grad
            else:
                buffer *= momentum
                buffer += (1 - dampening) * grad
            grad = grad + momentum * buffer if nesterov else buffer
        if lr == 1.0:  # exact either way; this skips a temporary (a pass and, for a big one, page faults)
            param -= grad
        else:
            param += grad * -lr  # Tensor.add_(grad, alpha=-lr)

    _by_elements(xp, update, param, grad, momentum_buffer)
    return momentum_buffer


def foreach_sgd_step(xp, params, grads, momentum_buffers, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                     nesterov=False, maximize=False):
    """sgd_step on every params[k] from grads[k] and momentum_buffers[k] (None at its first step), one list
    of parameters updated by one call (the compiled CPU kernels run them all in one pass). Returns the list
    of the buffers sgd_step returns."""
    check_list_lengths("foreach_sgd_step", params=params, grads=grads, momentum_buffers=momentum_buffers)
    return [sgd_step(xp, param, grad, buffer, lr, momentum, dampening, weight_decay, nesterov, maximize)
            for param, grad, buffer in zip(params, grads, momentum_buffers)]


def check_list_lengths(where, **lists):
    """Raise ValueError naming the lists' lengths unless they are all equal (the multi-tensor kernels' lists)."""
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{where}: the lists must have one entry per parameter, got lengths {lengths}")


def adam_step(xp, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps,
              weight_decay=0.0, decoupled=False, maximize=False):
    """One Adam (decoupled=False) or AdamW (decoupled=True) update of `param` in place, at step `step`
    (counted from 1), with torch's order of operations (see disttrain.optim.adam).

    exp_avg, exp_avg_sq (and max_exp_avg_sq for AMSGrad, else None) are updated in place. Element blocks
    run side by side on the intra-op threads.
    """
    step_size, bias_correction2_sqrt = adam_scalars(step, lr, beta1, beta2)

    def update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq):
        if maximize:
            grad = -grad
        if weight_decay != 0:
            if decoupled:
                param *= 1 - lr * weight_decay
            else:
                grad = grad + weight_decay * param
        _lerp_(exp_avg, grad, 1 - beta1)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad
        second_moment = exp_avg_sq
        if max_exp_avg_sq is not None:
            second_moment = max_exp_avg_sq
            xp.maximum(second_moment, exp_avg_sq, out=second_moment)
        denom = xp.sqrt(second_moment)
        denom /= bias_correction2_sqrt
        denom += eps
        direction = exp_avg * -step_size  # torch's addcdiv: (value * m) / denom
        direction /= denom
        param += direction

    _by_elements(xp, update, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)


def foreach_adam_step(xp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
                      weight_decay=0.0, decoupled=False, maximize=False):
    """adam_step on every params[k] from grads[k], its moments exp_avgs[k], exp_avg_sqs[k] and
    max_exp_avg_sqs[k] (None without AMSGrad) at its own step steps[k]: one list of parameters updated by one
    call (the compiled CPU kernels run them all in one pass)."""
    check_list_lengths("foreach_adam_step", params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                       max_exp_avg_sqs=max_exp_avg_sqs, steps=steps)
    for args in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
        adam_step(xp, *args, lr, beta1, beta2, eps, weight_decay, decoupled, maximize)


def adam_scalars(step, lr, beta1, beta2):
    """(step_size, sqrt of the second bias correction) of Adam's step `step`, as host floats."""
    return lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5


def _lerp_(target, end, weight):
    """target <- lerp(target, end, weight) in place, with torch's two-sided formula (exact at 0 and 1)."""
    diff = end - target
    if abs(weight) < 0.5:
        diff *= weight
        target += diff
    else:
        diff *= 1 - weight
        target[...] = end - diff


# ---- gradient norms and clipping ---------------------------------------------------------------------

def norms(xp, arrays, norm_type):
    """The norm of order `norm_type` (a float, inf for max |x|) of each array, as one 1-D array (empty for
    no arrays)."""
    if not arrays:
        return xp.zeros(0)
    parts = []
    with np.errstate(divide="ignore"):  # a negative order meets |0| ** order = inf, which makes the norm 0
        for a in arrays:
            flat = a.ravel()
            parts.append(xp.abs(flat).max() if norm_type == float("inf") else xp.linalg.norm(flat, ord=norm_type))
    return xp.stack(parts)


def scale_(xp, arrays, coef):
    """Multiply every array by the host scalar coef, in place (element blocks on the intra-op threads)."""
    def scale(block):
        with np.errstate(invalid="ignore"):  # inf * 0 (a clipped infinite gradient) is NaN, as torch's, unannounced
            block *= coef

    for a in arrays:
        _by_elements(xp, scale, a)


CLIP_EPSILON = 1e-6    # in max_norm / (total + CLIP_EPSILON), as PyTorch's clip_grad_norm_; norms.cu's clip_scale too


def clip_by_total_norm_(xp, arrays, max_norm, norm_type=2.0):
    """Scale the arrays in place so that their total norm is at most max_norm (coefficient
    max_norm / (total + CLIP_EPSILON), as clip_grad_norm_); returns the total norm before clipping as a 0-d
    float64 array of the backend. The CUDA kernel decides on the device, with no host round trip.
    """
    parts = norms(xp, arrays, norm_type).astype(xp.float64)
    if norm_type == float("inf"):
        total = parts.max()
    else:
        total = (parts ** norm_type).sum() ** (1.0 / norm_type)
    coef = max_norm / (total + CLIP_EPSILON)
    if not coef >= 1.0:    # a NaN total scales every array by NaN, as clip_grad_norm_ (and torch) do
        scale_(xp, arrays, coef.astype(arrays[0].dtype))
    return xp.asarray(total)


# ---- gradient buckets for allreduce ------------------------------------------------------------------

def bucket_pack(xp, arrays, out=None):
    """The arrays raveled back to back, in order, into one 1-D buffer (`out`, or a new one)."""
    total = sum(a.size for a in arrays)
    if out is None:
        out = xp.empty(total, dtype=arrays[0].dtype)
    elif out.shape != (total,):
        raise ValueError(f"bucket_pack: out has shape {out.shape}, the arrays need ({total},)")
    offset = 0
    for a in arrays:
        out[offset:offset + a.size] = a.ravel()
        offset += a.size
    return out


def bucket_unpack(xp, flat, arrays, scale=1.0):
    """Copy consecutive slices of the 1-D `flat` back into the arrays in place, times `scale`."""
    total = sum(a.size for a in arrays)
    if flat.shape != (total,):
        raise ValueError(f"bucket_unpack: flat has shape {flat.shape}, the arrays need ({total},)")
    offset = 0
    for a in arrays:
        part = flat[offset:offset + a.size].reshape(a.shape)
        a[...] = part * scale if scale != 1.0 else part
        offset += a.size


# ---- counter-based uniform random numbers ------------------------------------------------------------
# SplitMix64 (Steele, Lea & Flood 2014, Java's SplittableRandom) read as a counter-based generator:
# sample `counter` of seed s is mix64(mix64(s) + (counter + 1) * GOLDEN), i.e. the counter-th output of
# the SplitMix64 sequence that starts in state mix64(s). Stateless: the generator's whole state is
# (seed, offset), two integers, and any sample is computed without the ones before it, which is what
# lets a GPU thread produce sample i on its own. Its output passes BigCrush; plenty for dropout masks.
# All arithmetic is modulo 2^64 (NumPy's uint64 arrays wrap silently; random.cu does the same).

SPLITMIX_GOLDEN = 0x9E3779B97F4A7C15
SPLITMIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
UINT64_MASK = 2 ** 64 - 1
UNIT_BITS = {"float32": 24, "float64": 53}  # mantissa bits of a uniform sample: top bits * 2^-bits


def _splitmix64_mix(xp, z):
    """SplitMix64's finaliser on a uint64 array (any shape), elementwise, wrapping modulo 2^64."""
    m1, m2 = (xp.uint64(m) for m in SPLITMIX_MULTIPLIERS)
    z = (z ^ (z >> xp.uint64(30))) * m1
    z = (z ^ (z >> xp.uint64(27))) * m2
    return z ^ (z >> xp.uint64(31))


def counter_uniform(xp, shape, dtype, seed, offset):
    """Uniform samples in [0, 1) of `shape` and float `dtype` (float32: top 24 bits * 2^-24, float64:
    top 53 bits * 2^-53 of the hash), sample i (C order) being the counter-based SplitMix64 output for
    (seed, offset + i). The caller advances its offset by the number of samples."""
    dtype = xp.dtype(dtype)
    if dtype.name not in UNIT_BITS:
        raise TypeError(f"counter_uniform: dtype must be float32 or float64, got {dtype}")
    bits = UNIT_BITS[dtype.name]
    # (1,), not 0-d: NumPy warns about wrap-around in scalar arithmetic, never in array arithmetic
    key = _splitmix64_mix(xp, xp.asarray([int(seed) & UINT64_MASK], dtype=xp.uint64))
    n = 1
    for d in shape:
        n *= int(d)
    counters = xp.arange(n, dtype=xp.uint64) + xp.uint64((int(offset) + 1) & UINT64_MASK)
    z = _splitmix64_mix(xp, key + counters * xp.uint64(SPLITMIX_GOLDEN))
    top = (z >> xp.uint64(64 - bits)).astype(dtype)  # exact: at most `bits` significant bits
    return (top * dtype.type(2.0 ** -bits)).reshape(tuple(shape))


# ---- Transformer: GELU (tanh form), softmax over the last axis (optionally causal) -------------------

GELU_SCALE = 0.7978845608028654   # sqrt(2 / pi)
GELU_CUBIC = 0.044715


def _gelu_tanh(xp, x):
    """tanh(s (x + k x^3)) as a new array (s = GELU_SCALE, k = GELU_CUBIC)."""
    inner = xp.asarray(x * x)  # asarray: NumPy makes 0-d products scalars, which out= refuses
    inner *= GELU_CUBIC
    inner += 1
    inner *= x
    inner *= GELU_SCALE
    return xp.tanh(inner, out=inner)


def gelu_forward(xp, x):
    """y = 0.5 x (1 + tanh(s (x + k x^3))) (torch's gelu(approximate="tanh")), x any shape. A new array."""
    y = _gelu_tanh(xp, x)
    y += 1
    y *= x
    y *= 0.5
    return y


def gelu_backward(xp, grad_y, x):
    """grad_x of gelu_forward from its input x (the tanh recomputed, no second activation kept):
    grad_y * (0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 k x^2)), t = tanh(s (x + k x^3))."""
    t = _gelu_tanh(xp, x)
    slope = xp.asarray(x * x)    # 0.5 x (1 - t^2) s (1 + 3k x^2): the tanh argument's derivative part
    slope *= 3 * GELU_CUBIC * GELU_SCALE
    slope += GELU_SCALE
    slope *= x
    slope *= 0.5
    slope *= 1 - t * t
    t += 1                       # + 0.5 (1 + t)
    t *= 0.5
    t += slope
    t *= grad_y
    return t


# ---- GELU, exact form: x Phi(x), Phi the standard normal CDF ----------------------------------------------
# NumPy has no erf. Phi(x) = 0.5 erfc(-x / sqrt 2) from the rational approximations of Cephes (S. L. Moshier,
# ndtr.c): erf(z) = z T(z^2) / U(z^2) for |z| < 1 (peak relative error 3.7e-16), erfc(z) = exp(-z^2) P(z) / Q(z)
# for 1 <= z < 8 and exp(-z^2) R(z) / S(z) beyond, exp(-z^2) without the rounding of z^2 (below): Phi within
# ~3e-15 relative of math.erfc's down to x = -37.5 (tests/kernels_cuda/test_kernels_numpy.py). The erfc
# branch keeps Phi's relative accuracy in the left tail, where 0.5 (1 + erf) would keep no digits.
# Coefficients highest power first; Q, S and U with their leading 1.
ERF_T = (9.60497373987051638749E0, 9.00260197203842689217E1, 2.23200534594684319226E3,
         7.00332514112805075473E3, 5.55923013010394962768E4)
ERF_U = (1.0, 3.35617141647503099647E1, 5.21357949780152679795E2, 4.59432382970980127987E3,
         2.26290000613890934246E4, 4.92673942608635921086E4)
ERFC_P = (2.46196981473530512524E-10, 5.64189564831068821977E-1, 7.46321056442269912687E0,
          4.86371970985681366614E1, 1.96520832956077098242E2, 5.26445194995477358631E2,
          9.34528527171957607540E2, 1.02755188689515710272E3, 5.57535335369399327526E2)
ERFC_Q = (1.0, 1.32281951154744992508E1, 8.67072140885989742329E1, 3.54937778887819891062E2,
          9.75708501743205489753E2, 1.82390916687909736289E3, 2.24633760818710981792E3,
          1.65666309194161350182E3, 5.57535340817727675546E2)
ERFC_R = (5.64189583547755073984E-1, 1.27536670759978104416E0, 5.01905042251180477414E0,
          6.16021097993053585195E0, 7.40974269950448939160E0, 2.97886665372100240670E0)
ERFC_S = (1.0, 2.26052863220117276590E0, 9.39603524938001434673E0, 1.20489539808096656605E1,
          1.70814450747565897222E1, 9.60896809063285878198E0, 3.36907645100081516050E0)
ERFC_UNDERFLOW = 40.0   # erfc(z) is 0 in float64 from z ~ 27.3; the cap keeps R(z), S(z) finite
SQRT1_2 = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi), the normal density's factor
GELU_APPROXIMATIONS = ("none", "tanh")  # torch's approximate= values: the exact erf form, the tanh form


def _horner(z, coefs):
    acc = coefs[0]
    for c in coefs[1:]:
        acc = acc * z + c
    return acc


def _exp_minus_half_square(xp, x):
    """exp(-x^2 / 2) for float64 x as exp(-m^2 / 2) exp(-(m f + f^2 / 2)), |x| = m + f, m a multiple of 1/128
    (m^2 exact): of the rounded x^2 (or of z^2, z = x / sqrt 2 rounded) it would be off by up to x^2 ulps."""
    x_abs = xp.minimum(xp.abs(x), ERFC_UNDERFLOW / SQRT1_2)   # exp is 0 from there; NaN stays NaN
    m = xp.floor(x_abs * 128.0 + 0.5) * (1.0 / 128.0)
    f = x_abs - m
    return xp.exp(-0.5 * (m * m)) * xp.exp(-(m * f + 0.5 * (f * f)))


def _normal_cdf64(xp, x):
    """Phi(x) in float64 for a float64 array x (the rational approximations above)."""
    z = x * SQRT1_2
    a = xp.abs(z)
    zc = xp.clip(z, -1.0, 1.0)   # the central branch's own range: no inf / inf where it is not taken
    z2 = zc * zc
    central = 0.5 + 0.5 * (zc * _horner(z2, ERF_T) / _horner(z2, ERF_U))
    capped = xp.minimum(a, ERFC_UNDERFLOW)
    ratio = xp.where(capped < 8.0, _horner(capped, ERFC_P) / _horner(capped, ERFC_Q),
                     _horner(capped, ERFC_R) / _horner(capped, ERFC_S))
    half_erfc = 0.5 * _exp_minus_half_square(xp, x) * ratio   # 0.5 erfc(|z|) = exp(-z^2) ratio / 2: Phi(-|x|)
    return xp.where(a < 1.0, central, xp.where(z < 0, half_erfc, 1.0 - half_erfc))


def normal_cdf(xp, x):
    """Phi(x) = 0.5 (1 + erf(x / sqrt 2)), the standard normal CDF, in x's dtype (computed in float64)."""
    return xp.asarray(_normal_cdf64(xp, xp.asarray(x, dtype=xp.float64))).astype(x.dtype, copy=False)


def gelu_erf_forward(xp, x):
    """y = x Phi(x) (torch's gelu, approximate="none"), x any shape, computed in float64. A new array."""
    x64 = xp.asarray(x, dtype=xp.float64)
    with np.errstate(invalid="ignore"):  # -inf * Phi(-inf) = -inf * 0: NaN, as torch's
        return xp.asarray(x64 * _normal_cdf64(xp, x64)).astype(x.dtype, copy=False)


def gelu_erf_backward(xp, grad_y, x):
    """grad_x of gelu_erf_forward from its input x: grad_y (Phi(x) + x phi(x)), phi the normal density."""
    x64 = xp.asarray(x, dtype=xp.float64)
    with np.errstate(invalid="ignore"):  # +-inf * phi(+-inf) = +-inf * 0: NaN, as torch's
        slope = _normal_cdf64(xp, x64) + x64 * _exp_minus_half_square(xp, x64) * INV_SQRT_2PI
    return xp.asarray(grad_y * slope).astype(x.dtype, copy=False)


def check_gelu_approximate(approximate, where):
    """approximate as torch names it ("none": exact, "tanh"), else a one-line ValueError."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"{where}: approximate={approximate!r} is not one of 'none' (exact: x Phi(x), with erf) "
                         "or 'tanh'")
    return approximate


def softmax_forward(xp, x, causal=False):
    """softmax over the last axis of x (..., Tq, Tk) as a new array; causal: key j counts for query i
    (x's second-to-last axis) only where j <= i, the others get probability 0. The row maximum of the
    counted entries is subtracted before exp; a row whose counted entries are all -inf comes out zeros."""
    if causal:
        x = xp.where(xp.tri(x.shape[-2], x.shape[-1], dtype=bool), x, -xp.inf)
    top = x.max(axis=-1, keepdims=True)
    e = xp.exp(x - xp.where(xp.isfinite(top), top, 0))  # a row of -inf only: exp(-inf) = 0
    total = e.sum(axis=-1, keepdims=True)
    e /= xp.where(total > 0, total, 1)
    return e


def softmax_backward(xp, grad_y, y):
    """grad_x = y (grad_y - sum(grad_y y)) over the last axis, from softmax_forward's output y (any
    softmax over that axis: entries a mask left out have y = 0 and get 0)."""
    dot = xp.einsum("...j,...j->...", grad_y, y)[..., None]
    grad_x = grad_y - dot
    grad_x *= y
    return grad_x


def layer_norm_forward(xp, x, weight, bias, eps):
    """LayerNorm over the rows of x (N, D): y = (x - mean) rstd weight + bias, rstd = 1 / sqrt(var + eps)
    (the biased variance); weight, bias (D,) or None. Returns (y (N, D) new, mean (N,), rstd (N,)):
    what layer_norm_backward reads."""
    mean = x.mean(axis=1)
    centred = x - mean[:, None]
    var = xp.einsum("ij,ij->i", centred, centred) / x.shape[1]
    rstd = 1 / xp.sqrt(var + eps)
    centred *= rstd[:, None]
    if weight is not None:
        centred *= weight
    if bias is not None:
        centred += bias
    return centred, mean, rstd


def layer_norm_backward(xp, grad_y, x, weight, mean, rstd, with_bias=False):
    """Gradients of layer_norm_forward from its input x and its (mean, rstd): (grad_x (N, D),
    grad_weight (D,) or None without a weight, grad_bias (D,) when with_bias else None).
    grad_x = rstd (g - mean(g) - xhat mean(g xhat)) with g = grad_y weight, xhat = (x - mean) rstd."""
    xhat = (x - mean[:, None]) * rstd[:, None]
    g = grad_y * weight if weight is not None else grad_y
    d = x.shape[1]
    grad_x = g - (g.sum(axis=1) / d)[:, None]
    grad_x -= xhat * (xp.einsum("ij,ij->i", g, xhat) / d)[:, None]
    grad_x *= rstd[:, None]
    grad_weight = xp.einsum("ij,ij->j", grad_y, xhat) if weight is not None else None
    return grad_x, grad_weight, (grad_y.sum(axis=0) if with_bias else None)


# ---- scaled dot-product attention --------------------------------------------------------------------

def _attention_scores(xp, q, k, scale, causal):
    """q k^T * scale over the last two axes, -inf where `causal` leaves key j out for query i (j > i)."""
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2))
    scores *= scale
    if causal:
        scores = xp.where(xp.tri(scores.shape[-2], scores.shape[-1], dtype=bool), scores, -xp.inf)
    return scores


def attention_forward(xp, q, k, v, scale, causal):
    """softmax(q k^T * scale) v: q (..., L, E), k (..., S, E), v (..., S, Ev) with the same leading axes;
    causal: query i sees keys j <= i only (every query sees key 0, so no row is empty). Returns (out (..., L,
    Ev), saved), saved what attention_backward reads: here lse (..., L), each query's log-sum-exp of its
    scaled scores, from which backward recomputes the probabilities (the (L, S) probabilities are not kept).
    With no keys (S = 0) there is nothing to attend to: out is zeros (torch's answer too), lse -inf."""
    if k.shape[-2] == 0:
        return xp.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype), xp.full(q.shape[:-1], -xp.inf, dtype=q.dtype)
    scores = _attention_scores(xp, q, k, scale, causal)
    top = scores.max(axis=-1, keepdims=True)
    p = xp.exp(scores - top)
    total = p.sum(axis=-1, keepdims=True)
    p /= total
    return xp.matmul(p, v), (top + xp.log(total))[..., 0]


def attention_backward(xp, grad_out, q, k, v, out, saved, scale, causal):
    """(dq, dk, dv) of attention_forward from its output and `saved`, the row log-sum-exp: p = exp(scores -
    lse), and the softmax's backward takes sum_j dp_ij p_ij as sum_e grad_out_ie out_ie (the same number:
    out = p v). (The CUDA table's forward saves the probabilities instead, and its backward reads them.)"""
    p = xp.exp(_attention_scores(xp, q, k, scale, causal) - saved[..., None])
    dv = xp.matmul(xp.swapaxes(p, -1, -2), grad_out)
    ds = xp.matmul(grad_out, xp.swapaxes(v, -1, -2))
    ds -= xp.einsum("...e,...e->...", grad_out, out)[..., None]
    ds *= p
    ds *= scale
    return xp.matmul(ds, k), xp.matmul(xp.swapaxes(ds, -1, -2), q), dv


# ---- Linear's forward --------------------------------------------------------------------------------

def linear_forward(xp, x, w, bias):
    """Linear's forward as one new array: x (N, in) @ w.T + bias, with w (out, in) and bias (out,) or None.
    The compiled CPU kernel lets the GEMM add its product onto the bias (no pass of its own over the output)."""
    out = x @ w.T
    if bias is not None:
        add_bias_(xp, out, bias)
    return out
