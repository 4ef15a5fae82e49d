"""Shape and data-movement ops: reshape, permute and transpose, broadcast_to, concat, stack, split,
indexing (gather with scatter-add backward), dtype casts and device copies."""
import operator

from disttrain.autograd import grad_mode
from disttrain.autograd.function import Function, OpError
from disttrain.tensor import layout
from disttrain.tensor.tensor import Tensor, unwrap_index


class Reshape(Function):
    is_view = True

    def forward(self, a, shape):
        self.in_shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return g.reshape(self.in_shape)


class Permute(Function):
    """Reorder all axes (torch's permute, NumPy's transpose); an empty `axes` reverses them (x.T)."""

    is_view = True

    def forward(self, a, axes):
        axes = tuple(axes) if axes else tuple(reversed(range(a.ndim)))
        if sorted(a_ % a.ndim for a_ in axes) != list(range(a.ndim)) or len(axes) != a.ndim:
            raise ValueError(f"axes {axes} are not a permutation of {a.ndim} dimensions")
        self.axes = axes
        return a.transpose(axes)

    def backward(self, g):
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a % len(self.axes)] = i
        return g.permute(tuple(inverse))


class BroadcastTo(Function):
    is_view = True

    def forward(self, a, shape):
        self.in_shape = a.shape
        return self.xp.broadcast_to(a, shape)

    def backward(self, g):
        from disttrain.autograd.ops.elementwise import sum_to

        return sum_to(g, self.in_shape)


class Concat(Function):
    def forward(self, *arrays, axis):
        self.axis = axis
        self.sizes = [a.shape[axis] for a in arrays]
        return self.xp.concatenate(arrays, axis=axis)

    def backward(self, g):
        out, start = [], 0
        for i, n in enumerate(self.sizes):
            out.append(_slice(g, self.axis, start, start + n) if self.needs_grad(i) else None)
            start += n
        return tuple(out)


class Unbind(Function):
    """Split along an axis into its slices, one output each (a.shape[axis] outputs); backward stacks them.

    One node for all slices, where T separate GetItems would each scatter into a full-size zero
    gradient: this keeps per-time-step access to a (T, ...) tensor linear in T.
    """

    def forward(self, a, axis):
        self.n_outputs = a.shape[axis]
        self.axis = axis
        self.shape, self.dtype, self.order = a.shape, a.dtype, layout.axis_order(a)
        parts = tuple(self.xp.moveaxis(a, axis, 0))
        return parts if len(parts) != 1 else parts[0]

    def backward(self, *grads):
        if grad_mode.is_grad_enabled():  # create_graph: differentiable ops
            return stack(grads, axis=self.axis)
        # laid out as the input was: where that was a transposed view (attention's q, k, v cut from one
        # projection), transposing the gradient back to the projection's rows is a view, not a copy
        grad = layout.empty_in_order(self.xp, self.shape, self.dtype, self.order)
        for part, g in zip(self.xp.moveaxis(grad, self.axis, 0), grads):
            part[...] = g.data
        return Tensor._wrap(grad)


def unbind(a, axis=0):
    axis = axis % a.ndim
    out = Unbind.apply(a, axis=axis)
    return out if isinstance(out, tuple) else (out,)


def _slice(t, axis, start, stop):
    index = [slice(None)] * t.ndim
    index[axis] = slice(start, stop)
    return t[tuple(index)]


def _is_basic(index):
    """Basic indexing (ints, slices, None, Ellipsis) never repeats an element."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts)


class GetItem(Function):
    """x[index] with NumPy semantics; backward scatter-adds into zeros (IndexAdd)."""

    same_dtype = False
    is_view = True  # basic indexing returns a view (advanced indexing copies)

    def forward(self, a, index):
        self.in_shape = a.shape
        # NOTE: an index tensor changed in place before backward (a batch buffer refilled) must not move the
        # gradient to other rows: backward scatters with a copy of the index arrays (small next to x)
        self.index = _own_index_arrays(index) if self.recording else index
        return a[index]

    def backward(self, g):
        return IndexAdd.apply(g, shape=self.in_shape, index=self.index), None


def _own_index_arrays(index):
    """`index` with each of its arrays copied (ints, slices, None and Ellipsis as they are)."""
    if isinstance(index, tuple):
        return tuple(p.copy() if hasattr(p, "copy") else p for p in index)
    return index.copy() if hasattr(index, "copy") else index


class IndexAdd(Function):
    """zeros(shape)[index] += g, repeated indices accumulating; its backward is GetItem."""

    def forward(self, g, shape, index):
        self.index = index
        out = self.xp.zeros(shape, dtype=g.dtype)
        if _is_basic(index):
            out[index] = g
        else:
            self.backend.index_add(out, index, g)
        return out

    def backward(self, gg):
        return GetItem.apply(gg, self.index)


class Cast(Function):
    same_dtype = False

    def forward(self, a, dtype):
        self.in_dtype = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return Cast.apply(g, self.in_dtype)


class ToDevice(Function):
    def forward(self, a, backend):
        self.source = self.backend
        if backend.name == "cpu":
            return self.backend.to_numpy(a)
        return backend.asarray(a)

    def backward(self, g):
        return ToDevice.apply(g, self.source)


def reshape(a, shape):
    shape = tuple(shape)
    if a.shape == shape:
        return a
    return Reshape.apply(a, shape=shape)


def permute(a, axes=()):
    """Reorder all axes: output axis i is input axis axes[i] (torch's permute); () reverses them."""
    return Permute.apply(a, axes=tuple(axes))


def transpose(a, dim0, dim1):
    """Swap two axes (torch's transpose, NumPy's swapaxes); negative axes count from the end."""
    axes = list(range(a.ndim))
    i, j = (_axis(a, d, "transpose") for d in (dim0, dim1))
    if a.ndim:
        axes[i], axes[j] = axes[j], axes[i]
    return Permute.apply(a, axes=tuple(axes))


def _axis(a, d, where):
    """One axis of `a` as a non-negative int (0 for a 0-d tensor, as torch allows dims 0 and -1 there)."""
    n = max(a.ndim, 1)
    try:
        k = operator.index(d)
    except TypeError:
        k = None
    if k is None or not -n <= k < n:
        raise OpError(f"{where}: dim {d!r} is not an axis of a tensor of {a.ndim} dimensions (shape {a.shape}); "
                      "transpose(dim0, dim1) swaps two axes, permute(*dims) reorders all")
    return k % n


def broadcast_to(a, shape):
    if a.shape == tuple(shape):
        return a
    return BroadcastTo.apply(a, shape=tuple(shape))


def concat(tensors, axis=0, *, dim=None):
    """Join along an existing axis (torch's cat; dim= is torch's name for axis=)."""
    axis = _axis_or_dim("concat", axis, dim)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concat: needs at least one tensor")
    ndim = tensors[0].ndim
    axis = axis % ndim if ndim else axis
    return Concat.apply(*tensors, axis=axis)


def stack(tensors, axis=0, *, dim=None):
    """Join along a new axis (dim= is torch's name for axis=)."""
    axis = _axis_or_dim("stack", axis, dim)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: needs at least one tensor")
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise OpError(f"stack: all tensors must have the same shape, got {sorted(shapes)}")
    axis = axis % (tensors[0].ndim + 1)
    return concat([t.unsqueeze(axis) for t in tensors], axis=axis)


def _axis_or_dim(where, axis, dim):
    if dim is None:
        return axis
    if axis != 0:
        raise TypeError(f"{where}: got both axis={axis!r} and dim={dim!r}; pass one of them")
    return dim


def split(a, split_size_or_sections, axis=0):
    """Split into pieces of `split_size` (an int, last may be smaller) or of the listed sizes."""
    n = a.shape[axis]
    if isinstance(split_size_or_sections, int):
        size = split_size_or_sections
        if size <= 0:
            raise ValueError(f"split: split size must be positive, got {size}")
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        sizes = list(split_size_or_sections)
        if sum(sizes) != n:
            raise OpError(f"split: sizes {sizes} sum to {sum(sizes)}, but axis {axis} has length {n}")
    out, start = [], 0
    for s in sizes:
        out.append(_slice(a, axis, start, start + s))
        start += s
    return tuple(out)


def getitem(a, index):
    return GetItem.apply(a, unwrap_index(index))


def cast(a, dtype):
    return Cast.apply(a, dtype)


def to_device(a, backend):
    return ToDevice.apply(a, backend)
