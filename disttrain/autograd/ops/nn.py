"""Neural-network ops: softmax family, losses, dropout, layer norm, embedding."""
import math

from disttrain.autograd import grad_mode
from disttrain.autograd.function import Function, OpError
from disttrain.autograd.ops import reduce, shape
from disttrain.tensor.random import generator
from disttrain.tensor.tensor import Tensor


def _logsumexp(xp, x, axis):
    m = x.max(axis=axis, keepdims=True)
    return m + xp.log(xp.exp(x - m).sum(axis=axis, keepdims=True))


def _softmax(xp, x, axis=1):
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class LogSoftmax(Function):
    saves_output = True

    def forward(self, x, axis):
        self.axis = axis
        return x - _logsumexp(self.xp, x, axis)

    def backward(self, g):
        return g - self.output().exp() * g.sum(axis=self.axis, keepdims=True)


class Softmax(Function):
    """softmax along `axis`; over the last axis forward and backward are one kernel each
    (kernels_numpy.softmax_forward / softmax_backward)."""

    saves_output = True

    def forward(self, x, axis):
        self.axis = axis
        if self._last_axis(x.ndim):
            return self.backend.kernels.softmax_forward(self.xp, x)
        return _softmax(self.xp, x, axis)

    def backward(self, g):
        y = self.output()
        if not grad_mode.state.enabled and self._last_axis(y.ndim):  # no create_graph: one kernel
            return Tensor._wrap(self.backend.kernels.softmax_backward(self.xp, g.data, y.data))
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))

    def _last_axis(self, ndim):
        return ndim > 0 and self.axis in (-1, ndim - 1)


class CrossEntropy(Function):
    """Mean (or summed, or per-row) -log softmax(logits)[target] over rows whose target != ignore_index.

    logits (N, C) float, target (N,) int64. The backend's fused kernel computes the loss in one
    pass and keeps what backward needs (the probabilities on the CPU, the row log-sum-exp on the
    GPU), so backward is one more pass, unless create_graph asks for a differentiable softmax.
    """

    saves_inputs = (0,)
    same_dtype = False

    def forward(self, logits, target, ignore_index, reduction):
        xp = self.xp
        n, c = logits.shape
        if target.dtype.kind not in "iu":   # a float target would be cut to whole classes without a word
            raise TypeError(f"target must hold class indices (an integer dtype), got {target.dtype}; class "
                            f"probabilities as targets are not supported")
        if target.shape != (n,):
            raise ValueError(f"expected target shape ({n},), one class index per row of logits {logits.shape}, "
                             f"got {target.shape}")
        valid = target != ignore_index
        safe = xp.where(valid, target, 0)
        if self.backend.sync_checks and n and (safe.min() < 0 or safe.max() >= c):  # off in CUDA-graph capture
            bad = int(safe[(safe < 0) | (safe >= c)][0])
            raise ValueError(f"target class {bad} is out of range for {c} classes")
        # fused kernel: NumPy keeps the softmax for backward, CUDA the row log-sum-exp
        losses, softmax_state = self.backend.kernels.cross_entropy_forward(xp, logits, target, ignore_index,
                                                                            self.recording)
        count = valid.sum()
        if reduction == "mean":
            weight = valid / xp.maximum(count, 1)  # no host read of the count (GPU: no sync)
        elif reduction == "sum":
            weight = valid * 1.0
        elif reduction == "none":
            weight = None
        else:
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.target, self.valid = safe, valid
        self.weight = None if weight is None else weight.astype(logits.dtype)
        self.softmax_state = softmax_state if self.recording else None
        if weight is None:
            return losses.astype(logits.dtype, copy=False)
        total = (losses * weight).sum().astype(logits.dtype)
        # the mean over no target (all ignored) is 0/0, as torch's; its gradient stays 0, as torch's
        return xp.where(count > 0, total, xp.nan).astype(logits.dtype) if reduction == "mean" else total

    def backward(self, g):
        (logits,) = self.saved_inputs
        xp = self.xp
        n = logits.shape[0]
        rows = xp.arange(n)
        scale = self.weight if self.weight is not None else self.valid.astype(logits.dtype)
        if grad_mode.is_grad_enabled():  # create_graph: keep the softmax differentiable
            onehot = xp.zeros(logits.shape, dtype=logits.dtype)
            onehot[rows, self.target] = 1
            row_scale = (g * Tensor._wrap(scale)).reshape((n, 1))
            return (softmax(logits, axis=1) - Tensor._wrap(onehot)) * row_scale, None
        # (softmax - onehot) * scale from what forward kept (recomputed on a retained graph's second pass)
        saved, self.softmax_state = self.softmax_state, None
        grad = self.backend.kernels.cross_entropy_backward(xp, logits.data, self.target, saved, g.data * scale)
        return Tensor._wrap(grad), None

    def release(self):
        super().release()
        self.softmax_state = self.target = self.valid = self.weight = None


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def cross_entropy(logits, target, ignore_index=-100, reduction="mean"):
    """PyTorch's cross_entropy: logits (N, C) or (N, C, d1, ...), target (N,) or (N, d1, ...) class indices."""
    target = target.data if isinstance(target, Tensor) else target
    if logits.ndim > 2:  # move the class axis last and flatten the rest
        c = logits.shape[1]
        axes = (0,) + tuple(range(2, logits.ndim)) + (1,)
        out = CrossEntropy.apply(logits.permute(axes).reshape((-1, c)), target.reshape(-1),
                                 ignore_index=ignore_index, reduction=reduction)
        return out.reshape(target.shape) if reduction == "none" else out
    if logits.ndim != 2:
        raise OpError(f"cross_entropy: logits must be (N, C) or (N, C, ...), got shape {logits.shape}")
    return CrossEntropy.apply(logits, target, ignore_index=ignore_index, reduction=reduction)


def mse_loss(input, target, reduction="mean"):
    if input.shape != target.shape:
        raise OpError(f"mse_loss: input shape {input.shape} != target shape {target.shape}")
    d = input - target
    sq = d * d
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum()
    return sq


def dropout(x, p=0.5, training=True):
    """Inverted dropout: zero each element with probability p and scale the rest by 1/(1-p)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    gen = generator(x.backend)
    keep = gen.random(x.shape, dtype=x.dtype) >= p
    mask = Tensor._wrap((keep * (1.0 / (1 - p))).astype(x.dtype, copy=False))
    return x * mask


class LayerNorm(Function):
    """LayerNorm over the last `norm_ndim` axes of x, weight and bias (those axes' shape) or None: one
    kernel each way (kernels_numpy.layer_norm_forward / layer_norm_backward) on the rows of x viewed as
    (N, size of those axes). Forward keeps each row's mean and 1 / std; backward recomputes the
    normalised x from them and the saved input."""

    saves_inputs = (0, 1)

    def forward(self, x, weight, bias, norm_ndim, eps):
        self.norm_shape, self.eps = x.shape[x.ndim - norm_ndim:], eps
        size = math.prod(self.norm_shape)
        y, self.mean, self.rstd = self.backend.kernels.layer_norm_forward(
            self.xp, x.reshape((-1, size)), None if weight is None else weight.reshape(size),
            None if bias is None else bias.reshape(size), eps)
        return y.reshape(x.shape)

    def backward(self, g):
        x, weight = self.saved_inputs
        if grad_mode.state.enabled:  # create_graph: differentiable ops
            return self._differentiable_grads(g, x, weight)
        size = math.prod(self.norm_shape)
        grad_x, grad_w, grad_b = self.backend.kernels.layer_norm_backward(
            self.xp, g.data.reshape((-1, size)), x.data.reshape((-1, size)),
            None if weight is None else weight.data.reshape(size), self.mean, self.rstd, with_bias=self.needs_grad(2))
        return (Tensor._wrap(grad_x.reshape(x.shape)),
                Tensor._wrap(grad_w.reshape(self.norm_shape)) if self.needs_grad(1) else None,
                Tensor._wrap(grad_b.reshape(self.norm_shape)) if self.needs_grad(2) else None)

    def _differentiable_grads(self, g, x, weight):
        lead = x.ndim - len(self.norm_shape)
        axes, outer = tuple(range(lead, x.ndim)), tuple(range(lead))
        centred = x - reduce.mean(x, axes, keepdims=True)
        rstd = (reduce.mean(centred * centred, axes, keepdims=True) + self.eps) ** -0.5
        xhat = centred * rstd
        gw = g * weight if weight is not None else g
        grad_x = rstd * (gw - reduce.mean(gw, axes, keepdims=True) - xhat * reduce.mean(gw * xhat, axes, keepdims=True))
        return (grad_x,
                reduce.sum(g * xhat, outer) if self.needs_grad(1) else None,
                reduce.sum(g, outer) if self.needs_grad(2) else None)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalise over the trailing `normalized_shape` axes, then scale and shift (weight and bias of
    normalized_shape, or None: the LayerNorm op; weights that broadcast to it: composed ops)."""
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if x.shape[x.ndim - len(normalized_shape):] != normalized_shape:
        raise OpError(f"layer_norm: input shape {x.shape} does not end with normalized_shape {normalized_shape}")
    if x.size and all(p is None or (isinstance(p, Tensor) and p.shape == normalized_shape) for p in (weight, bias)):
        return LayerNorm.apply(x, weight, bias, len(normalized_shape), eps)
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mu = reduce.mean(x, axes, keepdims=True)
    centred = x - mu
    var = reduce.mean(centred * centred, axes, keepdims=True)
    out = centred * (var + eps) ** -0.5
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def embedding(indices, weight):
    """Rows of `weight` (V, D) picked by int64 `indices` of any shape -> indices.shape + (D,)."""
    idx = indices.data if isinstance(indices, Tensor) else indices
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding: indices must be integers, got dtype {idx.dtype}")
    if weight.backend.sync_checks and idx.size and (idx.min() < 0 or idx.max() >= weight.shape[0]):
        raise IndexError(f"embedding: index out of range [0, {weight.shape[0]}): min {idx.min()}, max {idx.max()}")
    return shape.getitem(weight, idx)
