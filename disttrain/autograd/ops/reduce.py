"""Reductions over any axes, with keepdims: sum, max (mean, var, min are composed from them)."""
import builtins
from disttrain.autograd.function import Function
from disttrain.tensor.tensor import Tensor


def normalize_axes(axis, ndim):
    """axis (None, int or tuple, negatives allowed) -> sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor of {ndim} dimensions")
        out.append(a % ndim if ndim else 0)
    return tuple(sorted(set(out)))


def kept_shape(shape, axes):
    """The shape of a keepdims=True reduction of `shape` over `axes`."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


class Sum(Function):
    def forward(self, a, axis, keepdims):
        self.in_shape = a.shape
        self.axes = normalize_axes(axis, a.ndim)
        self.keepdims = keepdims
        return a.sum(axis=self.axes, keepdims=keepdims)

    def backward(self, g):
        if not self.keepdims:
            g = g.reshape(kept_shape(self.in_shape, self.axes))
        return g.broadcast_to(self.in_shape)


class Max(Function):
    """Max over axes; tied maxima share the gradient evenly (as torch.amax)."""

    def forward(self, a, axis, keepdims):
        self.in_shape = a.shape
        self.axes = normalize_axes(axis, a.ndim)
        if a.size == 0:
            raise ValueError("max of an empty tensor")
        self.keepdims = keepdims
        out = a.max(axis=self.axes, keepdims=True)
        mask = a == out
        self.weight = mask / mask.sum(axis=self.axes, keepdims=True)
        return out if keepdims else out.reshape(tuple(n for i, n in enumerate(a.shape) if i not in self.axes))

    def backward(self, g):
        if not self.keepdims:
            g = g.reshape(kept_shape(self.in_shape, self.axes))
        return g * Tensor._wrap(self.xp.asarray(self.weight, dtype=g.dtype))  # asarray: a 0-d input gives scalars


def sum(a, axis=None, keepdims=False):
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a, axis=None, keepdims=False):
    axes = normalize_axes(axis, a.ndim)
    count = 1
    for i in axes:
        count *= a.shape[i]
    return Sum.apply(a, axis=axes, keepdims=keepdims) * (1.0 / builtins.max(count, 1))


def var(a, axis=None, keepdims=False):
    """Population variance (ddof=0), as layer norm uses it."""
    centred = a - mean(a, axis, keepdims=True)
    return mean(centred * centred, axis, keepdims)


def max(a, axis=None, keepdims=False):
    return Max.apply(a, axis=axis, keepdims=keepdims)


def min(a, axis=None, keepdims=False):
    return -Max.apply(-a, axis=axis, keepdims=keepdims)
