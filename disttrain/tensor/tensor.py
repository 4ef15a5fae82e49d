"""Tensor: an array on a backend plus what autograd needs (requires_grad, grad, the op that made it).

A tensor made by a recorded op points at that op's node (`grad_fn`) and its output index;
a leaf (made by the user, or a Parameter) has no node and, when it requires grad, gets its
gradient accumulated into `.grad`. Arithmetic methods are thin wrappers over
`disttrain.autograd.ops`, where each op's forward and backward live side by side.
"""

import numpy as np

from disttrain.tensor import dtypes
from disttrain.tensor.backend import backend_of_array, get_backend
from disttrain.tensor.memory import hook as _memory, track as _track_memory

_new_object = object.__new__


class Tensor:
    __slots__ = ("data", "requires_grad", "grad", "_node", "_out_index", "_version_box",
                 "_hooks", "_post_hooks", "_accumulator", "__weakref__")
    __array_priority__ = 1000  # so ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad=False):
        backend_of_array(data)  # type check: only backend arrays live in tensors
        self.data = data
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._node = None
        self._out_index = 0
        self._version_box = [0]
        self._hooks = None
        self._post_hooks = None
        self._accumulator = None
        if requires_grad and not dtypes.is_floating(data.dtype):
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {data.dtype}")
        if _memory.active:  # a MemoryMeter is running (disttrain.tensor.memory)
            _track_memory(data)

    @staticmethod
    def _wrap(data, node=None, index=0, version_box=None):
        """Fast constructor for op outputs: no checks, the op guarantees a backend array.

        A view of another tensor's memory passes that tensor's `version_box` to share its counter.
        """
        t = _new_object(Tensor)  # every op output and backward result comes here: names bound once
        t.data = data
        t.requires_grad = node is not None
        t.grad = None
        t._node = node
        t._out_index = index
        t._version_box = [0] if version_box is None else version_box
        t._hooks = None
        t._post_hooks = None
        t._accumulator = None
        if _memory.active:
            _track_memory(data)
        return t

    # ---- metadata -------------------------------------------------------------------------
    @property
    def _version(self):
        """In-place changes so far to this tensor's memory, counted once for it and all its views.

        NOTE: views (detach(), and reshape, transpose, broadcast_to, basic indexing when NumPy
        returns a view) share one counter, so changing a parameter in place is detected by every
        node that saved a view of it (x @ w.T, conv2d's reshaped weight).
        """
        return self._version_box[0]

    @_version.setter
    def _version(self, value):
        self._version_box[0] = value

    @property
    def version(self):
        """How many in-place changes this tensor's memory has seen (shared with its views); nodes that saved
        it compare this in backward."""
        return self._version_box[0]

    def increment_version(self):
        """Count an in-place change made behind the tensor's back (new .data, or a communicator writing into
        its memory), so that a backward through a graph that saved it fails instead of using the new values."""
        self._version_box[0] += 1

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def backend(self):
        return backend_of_array(self.data)

    @property
    def device(self):
        return self.backend.name

    @property
    def is_leaf(self):
        return self._node is None

    @property
    def grad_fn(self):
        return self._node

    def size(self, axis=None):
        return self.data.shape if axis is None else self.data.shape[axis]

    def numel(self):
        return self.data.size

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return len(self.data)

    def __iter__(self):
        """The sub-tensors along the first axis (`for row in x`, `a, b = x`), each differentiable, as torch's."""
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        return iter(_ops.unbind(self, 0))

    def __bool__(self):
        """The truth of a one-element tensor (`if loss < best:`); without this, Python would use len()."""
        if self.data.size != 1:
            raise RuntimeError(f"the truth value of a tensor of shape {self.shape} is ambiguous; "
                               "compare one element (t.item()) or reduce first (t.max(), t.min())")
        return bool(self.item())

    def __repr__(self):
        extra = f", device='{self.device}'" if self.device != "cpu" else ""
        if self._node is not None:
            extra += f", grad_fn={type(self._node).__name__}"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        body = np.array2string(self.numpy(), separator=", ", prefix="tensor(")
        return f"tensor({body}, dtype={self.dtype}{extra})"

    # ---- conversion -----------------------------------------------------------------------
    def numpy(self):
        """The values as a NumPy array (a copy from the GPU; the array itself on the CPU)."""
        return self.backend.to_numpy(self.data)

    def __array__(self, dtype=None, copy=None):
        """np.asarray(x): the values (this array itself on the CPU, a copy from the GPU); without it NumPy
        would iterate the tensor into an array of objects."""
        values = self.numpy()
        if dtype is not None:
            values = values.astype(dtype, copy=False)
        return values.copy() if copy else values

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def __float__(self):
        return float(self._one_element("float()"))

    def __int__(self):
        return int(self._one_element("int()"))

    def __index__(self):
        """As an index or a size (range(n), lst[i]): integer one-element tensors only, as torch's."""
        if self.dtype.kind not in "iub":
            raise TypeError(f"only integer tensors of a single element can be converted to an index, "
                            f"got dtype {self.dtype}")
        return int(self._one_element("__index__"))

    def _one_element(self, what):
        if self.data.size != 1:
            raise TypeError(f"{what}: only one-element tensors can be converted to Python scalars, "
                            f"got shape {self.shape}")
        return self.item()

    def to(self, device=None, dtype=None):
        """Copy to another device and/or dtype; differentiable. Returns self when nothing changes."""
        from disttrain.autograd import ops

        out = self
        if dtype is not None and dtypes.as_dtype(dtype) != self.dtype:
            out = ops.cast(out, dtypes.as_dtype(dtype))
        if device is not None and get_backend(device) is not out.backend:
            out = ops.to_device(out, get_backend(device))
        return out

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    def float(self):
        return self.to(dtype=dtypes.float32)

    def double(self):
        return self.to(dtype=dtypes.float64)

    def detach(self):
        """A tensor sharing this one's data, cut from the graph."""
        return Tensor._wrap(self.data, version_box=self._version_box)

    def requires_grad_(self, flag=True):
        if self._node is not None and not flag:
            raise RuntimeError("requires_grad_(False) is only for leaf tensors; use detach() on results of ops")
        if flag and not dtypes.is_floating(self.dtype):
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {self.dtype}")
        self.requires_grad = flag
        return self

    # ---- autograd -------------------------------------------------------------------------
    def backward(self, gradient=None, retain_graph=False, create_graph=False):
        """Accumulate d(self)/d(leaf) into every leaf's .grad. See disttrain.autograd.engine."""
        from disttrain.autograd.engine import backward

        backward([self], None if gradient is None else [gradient], retain_graph, create_graph)

    def register_hook(self, hook):
        """hook(grad) -> new grad or None, called when this tensor's gradient is computed."""
        from disttrain.autograd.hooks import register_tensor_hook

        return register_tensor_hook(self, hook)

    def register_post_accumulate_grad_hook(self, hook):
        """hook(tensor), called on a leaf once its .grad is final for the current backward pass.

        Fired as soon as no remaining op of the pass can add to this leaf's gradient, so data
        parallelism can start reducing it while backward continues.
        """
        from disttrain.autograd.hooks import register_post_accumulate_hook

        return register_post_accumulate_hook(self, hook)

    def retain_grad(self):
        """Keep .grad on a non-leaf tensor after backward."""
        from disttrain.autograd.hooks import retain_grad

        retain_grad(self)

    # ---- in-place updates (not recorded; they bump the version counter) -------------------
    def begin_inplace(self, what):
        """Before an in-place change of this tensor's memory (`what` names it in errors): refuse it where grad
        mode would record it, and count it (the version), so that saved copies of the old values are caught.
        Kernels that write .data directly (optimizers, clipping) call this first."""
        from disttrain.autograd.grad_mode import is_grad_enabled

        if self.requires_grad and is_grad_enabled():
            kind = "a leaf tensor that requires grad" if self._node is None else "a tensor that is part of a graph"
            raise RuntimeError(f"{what}: in-place change of {kind} while grad mode is on; "
                               "wrap it in `with dt.no_grad():` or use the out-of-place op")
        self._version += 1

    def _operand(self, other):
        return other.data if isinstance(other, Tensor) else other

    def add_(self, other, alpha=1.0):
        return self._add_scaled("add_", other, alpha)

    def sub_(self, other, alpha=1.0):
        return self._add_scaled("sub_", other, -alpha)

    def _add_scaled(self, what, other, alpha):
        self.begin_inplace(what)
        other = self._operand(other)
        if alpha != 1.0:
            other = other * alpha
        self.data += other
        return self

    def mul_(self, other):
        self.begin_inplace("mul_")
        self.data *= self._operand(other)
        return self

    def div_(self, other):
        self.begin_inplace("div_")
        self.data /= self._operand(other)
        return self

    def zero_(self):
        self.begin_inplace("zero_")
        self.data.fill(0)
        return self

    def fill_(self, value):
        self.begin_inplace("fill_")
        self.data.fill(value)
        return self

    def copy_(self, src):
        self.begin_inplace("copy_")
        src = self._operand(src)
        if getattr(src, "shape", None) != self.shape:
            raise ValueError(f"copy_: source shape {getattr(src, 'shape', ())} != destination shape {self.shape}")
        self.data[...] = src if type(src) is type(self.data) else self.backend.asarray(src)
        return self

    def __setitem__(self, index, value):
        self.begin_inplace("__setitem__")
        self.data[unwrap_index(index)] = self._operand(value)

    # ---- ops (thin wrappers; see disttrain.autograd.ops) ----------------------------------
    def __add__(self, other):
        return _ops.add(self, other)

    def __radd__(self, other):
        return _ops.add(other, self)

    def __sub__(self, other):
        return _ops.sub(self, other)

    def __rsub__(self, other):
        return _ops.sub(other, self)

    def __mul__(self, other):
        return _ops.mul(self, other)

    def __rmul__(self, other):
        return _ops.mul(other, self)

    def __truediv__(self, other):
        return _ops.div(self, other)

    def __rtruediv__(self, other):
        return _ops.div(other, self)

    def __pow__(self, exponent):
        return _ops.pow(self, exponent)

    def __rpow__(self, base):
        return _ops.pow(base, self)

    def __neg__(self):
        return _ops.neg(self)

    def __abs__(self):
        return _ops.abs(self)

    # x += y changes x's memory (its aliases see it), as torch's, through add_ and its checks: refused on a
    # leaf that requires grad in grad mode. Where torch would record the change in the graph (x part of one,
    # or y requiring grad, in grad mode), disttrain records no in-place ops: x is rebound to x + y instead,
    # the same values, which x's aliases do not see.
    def __iadd__(self, other):
        return NotImplemented if self._graph_records(other) else self.add_(other)

    def __isub__(self, other):
        return NotImplemented if self._graph_records(other) else self.sub_(other)

    def __imul__(self, other):
        return NotImplemented if self._graph_records(other) else self.mul_(other)

    def __itruediv__(self, other):
        return NotImplemented if self._graph_records(other) else self.div_(other)

    def _graph_records(self, other):
        """Whether torch would record `self op= other` in the graph (NotImplemented then makes Python rebind)."""
        from disttrain.autograd.grad_mode import is_grad_enabled

        if (self.requires_grad and self._node is None) or not is_grad_enabled():
            return False  # in place, or add_'s refusal of a leaf that requires grad
        return self._node is not None or (isinstance(other, Tensor) and other.requires_grad)

    def __matmul__(self, other):
        return _ops.matmul(self, other)

    def __rmatmul__(self, other):
        return _ops.matmul(other, self)

    def __getitem__(self, index):
        return _ops.getitem(self, index)

    # comparisons give boolean tensors with no gradient
    def _constant(self, result):
        """Wrap a result computed on self.data; asarray because NumPy turns 0-d results into scalars."""
        return Tensor._wrap(self.backend.xp.asarray(result))

    def __lt__(self, other):
        return self._constant(self.data < self._operand(other))

    def __le__(self, other):
        return self._constant(self.data <= self._operand(other))

    def __gt__(self, other):
        return self._constant(self.data > self._operand(other))

    def __ge__(self, other):
        return self._constant(self.data >= self._operand(other))

    def __eq__(self, other):
        """Element by element, as torch's: a boolean tensor (`(pred == y).float().mean()`); against None or
        anything that is not a number, an array or a tensor, Python's identity comparison (False)."""
        if not _comparable(other):
            return NotImplemented
        return self._constant(self.data == self._operand(other))

    def __ne__(self, other):
        if not _comparable(other):
            return NotImplemented
        return self._constant(self.data != self._operand(other))

    def eq(self, other):
        """Element by element, as ==, for any operand NumPy compares with."""
        return self._constant(self.data == self._operand(other))

    def ne(self, other):
        return self._constant(self.data != self._operand(other))

    __hash__ = object.__hash__      # by identity, as torch's: tensors stay usable as dict keys and in sets

    def exp(self):
        return _ops.exp(self)

    def log(self):
        return _ops.log(self)

    def tanh(self):
        return _ops.tanh(self)

    def sigmoid(self):
        return _ops.sigmoid(self)

    def relu(self):
        return _ops.relu(self)

    def sqrt(self):
        return _ops.pow(self, 0.5)

    def abs(self):
        return _ops.abs(self)

    def clip(self, min=None, max=None):
        return _ops.clip(self, min, max)

    clamp = clip

    # reductions take NumPy's names (axis=, keepdims=) or torch's (dim=, keepdim=)
    def sum(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return _ops.sum(self, axis, keepdims, dim=dim, keepdim=keepdim)

    def mean(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return _ops.mean(self, axis, keepdims, dim=dim, keepdim=keepdim)

    def var(self, axis=None, *, correction=None, unbiased=None, keepdims=False, dim=None, keepdim=None):
        """Unbiased (correction=1) unless told otherwise, as torch's; keepdims is keyword-only, as torch's
        keepdim, so that torch's old positional var(dim, unbiased) cannot be taken for var(axis, keepdims)."""
        return _ops.var(self, axis, correction=correction, unbiased=unbiased, keepdims=keepdims, dim=dim,
                        keepdim=keepdim)

    def std(self, axis=None, *, correction=None, unbiased=None, keepdims=False, dim=None, keepdim=None):
        return _ops.std(self, axis, correction=correction, unbiased=unbiased, keepdims=keepdims, dim=dim,
                        keepdim=keepdim)

    def max(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        """The largest element; with one axis, the namedtuple (values, indices) as torch's x.max(dim);
        with another tensor, the elementwise maximum. See disttrain.autograd.ops.reduce.max."""
        return _ops.max(self, axis, keepdims, dim=dim, keepdim=keepdim)

    def min(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return _ops.min(self, axis, keepdims, dim=dim, keepdim=keepdim)

    def amax(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return _ops.amax(self, axis, keepdims, dim=dim, keepdim=keepdim)

    def amin(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return _ops.amin(self, axis, keepdims, dim=dim, keepdim=keepdim)

    def argmax(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        axis, keepdims = _ops.torch_names("argmax", axis, keepdims, dim, keepdim)
        return self._constant(self.data.argmax(axis=axis, keepdims=keepdims))

    def argmin(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        axis, keepdims = _ops.torch_names("argmin", axis, keepdims, dim, keepdim)
        return self._constant(self.data.argmin(axis=axis, keepdims=keepdims))

    def reshape(self, *shape):
        return _ops.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    view = reshape

    def flatten(self, start_dim=0, end_dim=-1):
        """Merge axes start_dim..end_dim (inclusive, negatives from the end) into one, as torch's."""
        if self.ndim == 0:
            return self.reshape((1,))
        start, end = start_dim % self.ndim, end_dim % self.ndim
        if start > end:
            raise ValueError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim} (shape {self.shape})")
        return self.reshape(self.shape[:start] + (-1,) + self.shape[end + 1:])

    def transpose(self, *dims):
        """Swap two axes, as torch's x.transpose(dim0, dim1); permute(*dims) reorders all of them."""
        if len(dims) != 2:
            raise TypeError(f"transpose(dim0, dim1) swaps two axes, got {dims}; "
                            "reorder all axes with permute(*dims)")
        return _ops.transpose(self, *dims)

    swapaxes = transpose

    def permute(self, *dims):
        """Reorder all axes: output axis i is input axis dims[i] (permute(2, 0, 1) or permute((2, 0, 1)))."""
        return _ops.permute(self, dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims)

    @property
    def T(self):
        return _ops.permute(self, ())

    def broadcast_to(self, shape):
        return _ops.broadcast_to(self, tuple(shape))

    def squeeze(self, axis=None):
        """Drop the given size-1 axis, or every size-1 axis when none is given."""
        if axis is None:
            return self.reshape(tuple(n for n in self.shape if n != 1))
        shape = list(self.shape)
        if shape[axis] != 1:
            raise ValueError(f"squeeze: axis {axis} has size {shape[axis]}, not 1 (shape {self.shape})")
        del shape[axis]
        return self.reshape(tuple(shape))

    def unsqueeze(self, axis):
        shape = list(self.shape)
        shape.insert(axis if axis >= 0 else len(shape) + 1 + axis, 1)
        return self.reshape(tuple(shape))


def _comparable(other):
    """Whether `tensor == other` compares elements: tensors, arrays, numbers and bools (not None, str, ...)."""
    return isinstance(other, (Tensor, np.ndarray, np.generic, int, float, bool, complex)) or (
        type(other).__module__.startswith("cupy") and hasattr(other, "shape"))


def unwrap_index(index):
    """Replace Tensors inside an index with their arrays."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


from disttrain.autograd import ops as _ops  # noqa: E402  (ops sit on Tensor; Tensor methods call them)
