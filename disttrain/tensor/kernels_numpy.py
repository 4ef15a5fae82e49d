"""Fused kernels written with the array module: the CPU implementation and the reference that
every CUDA kernel in disttrain/kernels_cuda is tested against.

Each function takes and returns raw arrays (xp = numpy or cupy) and documents its layout.
"""


def sigmoid(xp, a):
    e = xp.exp(-xp.abs(a))  # exp of a non-positive number only: no overflow
    return xp.where(a >= 0, 1 / (1 + e), e / (1 + e)).astype(a.dtype, copy=False)


def lstm_cell_forward(xp, gates_x, h, c, w_hh):
    """One LSTM step.

    gates_x (B, 4H): input projection x_t @ W_ih^T + b_ih + b_hh, gate order i, f, g, o (PyTorch's)
    h, c (B, H): previous hidden and cell state;  w_hh (4H, H)
    Returns h_new, c_new (B, H) and the activations backward needs: acts (B, 4H) = [i, f, g, o], tanh_c (B, H).
    """
    hidden = h.shape[1]
    pre = gates_x + h @ w_hh.T
    acts = xp.empty_like(pre)
    acts[:, :2 * hidden] = sigmoid(xp, pre[:, :2 * hidden])
    acts[:, 2 * hidden:3 * hidden] = xp.tanh(pre[:, 2 * hidden:3 * hidden])
    acts[:, 3 * hidden:] = sigmoid(xp, pre[:, 3 * hidden:])
    i, f, g, o = (acts[:, k * hidden:(k + 1) * hidden] for k in range(4))
    c_new = f * c + i * g
    tanh_c = xp.tanh(c_new)
    return o * tanh_c, c_new, acts, tanh_c


def lstm_cell_backward(xp, dh, dc, acts, tanh_c, h, c, w_hh):
    """Gradients of one LSTM step: returns d_gates_x (B, 4H), dh_prev, dc_prev (B, H), dw_hh (4H, H)."""
    hidden = h.shape[1]
    i, f, g, o = (acts[:, k * hidden:(k + 1) * hidden] for k in range(4))
    dc_total = dc + dh * o * (1 - tanh_c * tanh_c)
    dpre = xp.empty_like(acts)
    dpre[:, :hidden] = dc_total * g * i * (1 - i)
    dpre[:, hidden:2 * hidden] = dc_total * c * f * (1 - f)
    dpre[:, 2 * hidden:3 * hidden] = dc_total * i * (1 - g * g)
    dpre[:, 3 * hidden:] = dh * tanh_c * o * (1 - o)
    return dpre, dpre @ w_hh, dc_total * f, dpre.T @ h


# ---- fused log-softmax + cross-entropy ---------------------------------------------------------------

def cross_entropy_forward(xp, logits, target, ignore_index, keep_softmax=False):
    """Per-row -log softmax(logits)[target]: logits (N, C) float, target (N,) int, rows whose target is
    ignore_index give 0. Classes must be in [0, C) elsewhere (the op checks).

    Returns (losses (N,), saved): `saved` is what cross_entropy_backward reads. Here it is the
    softmax (N, C) when keep_softmax (backward then scales it in place: no second exp pass), else
    None. The CUDA kernel returns the row log-sum-exp (N,) instead and recomputes exp in backward's
    single pass; cross_entropy_backward below accepts all three forms.
    """
    n = logits.shape[0]
    valid = target != ignore_index
    safe = xp.where(valid, target, 0)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    sumexp = exp.sum(axis=1, keepdims=True)
    losses = (xp.log(sumexp[:, 0]) - shifted[xp.arange(n), safe]) * valid
    return losses, (exp / sumexp if keep_softmax else None)


def cross_entropy_backward(xp, logits, target, saved, row_scale):
    """grad (N, C) = (softmax(logits) - onehot(target)) * row_scale[:, None].

    target (N,): a class in [0, C) for every row (rows with row_scale 0, e.g. ignored ones, may hold
    any class); row_scale (N,): d loss / d loss_row. `saved`: forward's softmax (N, C), overwritten
    with the result; the row log-sum-exp (N,); or None (the softmax is recomputed).
    """
    n = logits.shape[0]
    if saved is None:
        shifted = logits - logits.max(axis=1, keepdims=True)
        grad = xp.exp(shifted)
        grad /= grad.sum(axis=1, keepdims=True)
    elif saved.ndim == 1:
        grad = xp.exp(logits - saved[:, None])
    else:
        grad = saved
    grad *= row_scale.reshape(n, 1)
    grad[xp.arange(n), target] -= row_scale
    return grad


# ---- embedding backward (scatter-add) ----------------------------------------------------------------

def index_add_rows(xp, target, index, values):
    """target[index[r]] += values[r] in place, repeated indices accumulating.

    target (V, D); index int array of any shape; values index.shape + (D,).
    """
    xp.add.at(target, index, values)


def embedding_backward(xp, grad, indices, num_embeddings):
    """The weight gradient (V, D) of an embedding lookup: grad indices.shape + (D,) summed into rows."""
    d = grad.shape[-1]
    out = xp.zeros((num_embeddings, d), dtype=grad.dtype)
    index_add_rows(xp, out, indices.reshape(-1), grad.reshape(-1, d))
    return out


# ---- fused elementwise chains ------------------------------------------------------------------------

ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid")  # codes 0..3, as common.cuh DT_ACT_*


def _check_activation(act):
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def bias_act_forward(xp, x, bias, act):
    """y = act(x + bias): x (..., C), bias (C,) or None, act one of ACTIVATIONS. Returns a new array."""
    _check_activation(act)
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
    _check_activation(act)
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
    never modified.
    """
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad + weight_decay * param
    if momentum != 0:
        if momentum_buffer is None:
            # a copy: `grad` may be the parameter's own .grad array, which the caller may change later
            momentum_buffer = grad.copy()
        else:
            momentum_buffer *= momentum
            momentum_buffer += (1 - dampening) * grad
        grad = grad + momentum * momentum_buffer if nesterov else momentum_buffer
    alpha = -lr  # Tensor.add_(grad, alpha=-lr)
    param += grad * alpha if alpha != 1.0 else grad
    return momentum_buffer


def adam_step(xp, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps,
              weight_decay=0.0, decoupled=False, maximize=False):
    """One Adam (decoupled=False) or AdamW (decoupled=True) update of `param` in place, at step `step`
    (counted from 1), with torch's order of operations (see disttrain.optim.adam).

    exp_avg, exp_avg_sq (and max_exp_avg_sq for AMSGrad, else None) are updated in place.
    """
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
    step_size, bias_correction2_sqrt = adam_scalars(step, lr, beta1, beta2)
    denom = xp.sqrt(second_moment)
    denom /= bias_correction2_sqrt
    denom += eps
    direction = exp_avg * -step_size  # torch's addcdiv: (value * m) / denom
    direction /= denom
    param += direction


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
    """The norm of order `norm_type` (a float, inf for max |x|) of each array, as one 1-D array."""
    parts = []
    for a in arrays:
        flat = a.ravel()
        parts.append(xp.abs(flat).max() if norm_type == float("inf") else xp.linalg.norm(flat, ord=norm_type))
    return xp.stack(parts)


def scale_(xp, arrays, coef):
    """Multiply every array by the host scalar coef, in place."""
    for a in arrays:
        a *= coef


def clip_by_total_norm_(xp, arrays, max_norm, norm_type=2.0):
    """Scale the arrays in place so that their total norm is at most max_norm (coefficient
    max_norm / (total + 1e-6), as clip_grad_norm_); returns the total norm before clipping as a 0-d
    float64 array of the backend. The CUDA kernel decides on the device, with no host round trip.
    """
    parts = norms(xp, arrays, norm_type).astype(xp.float64)
    if norm_type == float("inf"):
        total = parts.max()
    else:
        total = (parts ** norm_type).sum() ** (1.0 / norm_type)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
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
