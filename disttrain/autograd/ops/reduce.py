"""Reductions over any axes, with keepdims: sum, max (mean, var, std, min are composed from them); max and
min along one axis with their indices; torch's keyword names (dim=, keepdim=) beside NumPy's."""
import builtins
import math
from collections import namedtuple

import numpy as np

from disttrain.autograd.function import Function
from disttrain.autograd.ops.elementwise import maximum, minimum
from disttrain.autograd.ops.shape import getitem
from disttrain.tensor.tensor import Tensor


def normalize_axes(axis, ndim):
    """axis (None, int or tuple, negatives allowed) -> sorted tuple of non-negative axes. None and an empty
    tuple or list mean every axis, as torch's dim=() (not NumPy's axis=(), which reduces none)."""
    axes = (axis,) if isinstance(axis, (int, np.integer)) or axis is None else tuple(axis)
    if axis is None or not axes:
        return tuple(range(ndim))
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


MaxResult = namedtuple("max", ("values", "indices"))  # torch.return_types.max: (values, indices) by dim
MinResult = namedtuple("min", ("values", "indices"))


def torch_names(where, axis, keepdims, dim, keepdim):
    """(axis, keepdims) from NumPy's names or torch's (dim=, keepdim=): either spelling, not both."""
    if dim is not None:
        if axis is not None:
            raise TypeError(f"{where}: got both axis={axis!r} and dim={dim!r}; pass one of them")
        axis = dim
    if keepdim is not None:
        if keepdims and not keepdim:
            raise TypeError(f"{where}: got both keepdims=True and keepdim=False; pass one of them")
        keepdims = bool(keepdim)
    return axis, keepdims


def sum(a, axis=None, keepdims=False, *, dim=None, keepdim=None):
    axis, keepdims = torch_names("sum", axis, keepdims, dim, keepdim)
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a, axis=None, keepdims=False, *, dim=None, keepdim=None):
    axis, keepdims = torch_names("mean", axis, keepdims, dim, keepdim)
    axes = normalize_axes(axis, a.ndim)
    return Sum.apply(a, axis=axes, keepdims=keepdims) * (1.0 / builtins.max(_count(a, axes), 1))


def var(a, axis=None, *, correction=None, unbiased=None, keepdims=False, dim=None, keepdim=None):
    """Variance with torch's divisor N - correction: unbiased (correction=1) unless told otherwise;
    correction=0 (or unbiased=False) gives the population variance. N - correction <= 0 gives the value inf
    or nan, as torch's (the gradient may be nan where torch's is +-inf)."""
    axis, keepdims = torch_names("var", axis, keepdims, dim, keepdim)
    if unbiased is not None:
        if correction is not None:
            raise TypeError(f"var: got both correction={correction!r} and unbiased={unbiased!r}; pass one of them")
        correction = 1 if unbiased else 0
    correction = 1 if correction is None else correction
    axes = normalize_axes(axis, a.ndim)
    centred = a - mean(a, axes, keepdims=True)
    divisor = _count(a, axes) - correction
    return Sum.apply(centred * centred, axis=axes, keepdims=keepdims) * (1.0 / divisor if divisor > 0 else math.inf)


def std(a, axis=None, *, correction=None, unbiased=None, keepdims=False, dim=None, keepdim=None):
    """Square root of var(), with the same arguments (unbiased unless told otherwise, as torch's)."""
    return var(a, axis, correction=correction, unbiased=unbiased, keepdims=keepdims, dim=dim, keepdim=keepdim) ** 0.5


def _count(a, axes):
    count = 1
    for i in axes:
        count *= a.shape[i]
    return count


def amax(a, axis=None, keepdims=False, *, dim=None, keepdim=None):
    """Max over any axes (all by default); tied maxima share the gradient evenly, as torch.amax."""
    axis, keepdims = torch_names("amax", axis, keepdims, dim, keepdim)
    return Max.apply(a, axis=axis, keepdims=keepdims)


def amin(a, axis=None, keepdims=False, *, dim=None, keepdim=None):
    axis, keepdims = torch_names("amin", axis, keepdims, dim, keepdim)
    return -Max.apply(-a, axis=axis, keepdims=keepdims)


def max(a, axis=None, keepdims=False, *, dim=None, keepdim=None):
    """As torch.max: max(a) the largest element; max(a, dim) the namedtuple (values, indices) along that one
    axis, the gradient going to the element indices names; max(a, b) of two tensors the elementwise maximum.
    A tuple of axes reduces them all, as amax."""
    return _max_or_min("max", a, axis, keepdims, dim, keepdim)


def min(a, axis=None, keepdims=False, *, dim=None, keepdim=None):
    """As torch.min (see max)."""
    return _max_or_min("min", a, axis, keepdims, dim, keepdim)


def _max_or_min(kind, a, axis, keepdims, dim, keepdim):
    elementwise, arg, result, over_axes = {"max": (maximum, "argmax", MaxResult, amax),
                                           "min": (minimum, "argmin", MinResult, amin)}[kind]
    if isinstance(axis, Tensor):
        if keepdims or dim is not None or keepdim is not None:
            raise TypeError(f"{kind}(a, b) of two tensors is elementwise and takes no dim or keepdim")
        return elementwise(a, axis)
    axis, keepdims = torch_names(kind, axis, keepdims, dim, keepdim)
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        return result(*_extreme_along(a, axis, keepdims, arg))
    return over_axes(a, axis, keepdims)


def _extreme_along(a, axis, keepdims, arg):
    """(values, int64 indices) of the first max (argmax) or min (argmin) along one axis; the values are
    a[indices] gathered, so their gradient goes to those elements only, as torch's."""
    (axis,) = normalize_axes(axis, a.ndim)
    flat = a.reshape((1,)) if a.ndim == 0 else a
    if flat.shape[axis] == 0:
        raise ValueError(f"{arg[3:]}: axis {axis} of the tensor of shape {a.shape} is empty")
    xp = a.backend.xp
    picked = getattr(xp, arg)(flat.data, axis=axis, keepdims=True)
    index = tuple(picked if i == axis else xp.arange(n).reshape((-1,) + (1,) * (flat.ndim - 1 - i))
                  for i, n in enumerate(flat.shape))
    values = getitem(flat, index)
    out_shape = kept_shape(a.shape, (axis,)) if keepdims else tuple(n for i, n in enumerate(a.shape) if i != axis)
    return values.reshape(out_shape), Tensor._wrap(picked.astype(xp.int64, copy=False).reshape(out_shape))
