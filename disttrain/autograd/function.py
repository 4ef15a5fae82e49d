"""Function: one differentiable op, forward and backward side by side.

Forward runs on raw backend arrays (fast, no graph); backward runs on Tensors with
differentiable ops, so `create_graph=True` yields higher-order gradients for free.

An op declares what backward needs (as Chainer does) instead of keeping all inputs alive:
  saves_inputs = (0, 1)   input tensors backward reads (checked against in-place changes)
  saves_output = True     backward reads its own output (exp, tanh, sigmoid, softmax, ...)
Anything else backward needs it stores on `self` in forward (shapes, masks, indices).
NOTE: a node holds its parents' nodes, not their tensors, so activations that backward does
not need are freed as soon as the user drops them.
"""
import itertools
import weakref

import numpy as np

from disttrain.autograd import observe
from disttrain.autograd.grad_mode import state as _grad_mode
from disttrain.autograd.observe import state as _observing
from disttrain.tensor.backend import BACKEND_OF_ARRAY_TYPE as _BACKENDS
from disttrain.tensor.tensor import Tensor

_sequence = itertools.count()      # every recorded node's number: later nodes have larger ones
_PLAIN = frozenset({float, int, bool, type(None), tuple, str})  # op parameters passed through as they are


def next_sequence():
    """A number above every recorded node's so far, below every later one's (nodes are numbered as recorded)."""
    return next(_sequence)


class OpError(ValueError):
    """Bad input to an op (shapes, dtypes, devices): the message names the op and the inputs."""


class Function:
    saves_inputs = ()
    saves_output = False
    n_outputs = 1
    same_dtype = True  # tensor inputs must share one dtype (see disttrain.tensor.dtypes)
    is_view = False    # the output may be a view of input 0: it then shares input 0's version counter
    # per-node state with class defaults (set on the instance when it differs: fewer stores per op)
    saved = ()         # ((input, its version at forward), ...) for saves_inputs; None once released
    saved_out = ()     # ((weakref to output, version, array), ...) when saves_output; None once released
    out_hooks = None   # {output index: [hooks]} (disttrain.autograd.hooks)

    # ---- subclass API ----------------------------------------------------------------------
    def forward(self, *arrays, **params):
        raise NotImplementedError

    def backward(self, *grads):
        """Gradients (Tensors or None) w.r.t. each input, given the gradients of the outputs."""
        raise NotImplementedError

    def needs_grad(self, i):
        return self.next_edges[i] is not None

    @property
    def saved_inputs(self):
        """The saved input tensors (constants as given), verified unchanged since forward."""
        saved = self.saved
        if saved is None:
            raise RuntimeError(
                f"Trying to backward through {type(self).__name__} a second time: its saved tensors were freed "
                "after the first backward. Pass retain_graph=True to the first backward() if you need to "
                "backward through the graph again.")
        inputs = []  # a plain loop: every backward that reads its inputs runs this
        for t, version in saved:
            if isinstance(t, Tensor) and t._version_box[0] != version:
                _raise_modified(self, t, version)
            inputs.append(t)
        return tuple(inputs)

    def output(self, i=0):
        """This op's own output i as a tensor connected to this node (for create_graph)."""
        return Tensor._wrap(self.output_data(i), self, i)

    def output_data(self, i=0):
        """The array of this op's own output i, verified unchanged since forward (backward without create_graph)."""
        if self.saved_out is None:
            self.saved_inputs  # raises the "second backward" error
        ref, version, data = self.saved_out[i]
        live = ref()
        if live is not None and live._version_box[0] != version:
            raise RuntimeError(f"{type(self).__name__}: its output was modified in place after forward; "
                               "gradients would be wrong. Use an out-of-place op.")
        return data

    # ---- machinery -------------------------------------------------------------------------
    @classmethod
    def apply(cls, *inputs, **params):
        """Run forward on the inputs' arrays and, in grad mode, record the node."""
        if _observing.active and not observe.take_bypass():  # an op observer listens (autograd.observe)
            return observe.observed_apply(cls, inputs, params)
        node = cls.__new__(cls)
        enabled = _grad_mode.enabled
        arrays = []
        # where the gradient w.r.t. each input goes: its producer node, a leaf's accumulator, or nowhere
        # (one plain loop over the inputs: this runs for every op, and a comprehension costs a call)
        edges = []
        first = None
        requires = False
        constants = None
        for x in inputs:
            if isinstance(x, Tensor):
                data = x.data
                arrays.append(data)
                if x.requires_grad:
                    requires = True
                    if enabled:
                        edges.append((x._node, x._out_index) if x._node is not None else (accumulator_of(x), 0))
                    else:
                        edges.append(None)
                else:
                    edges.append(None)
                if first is None:
                    first = data
                elif type(data) is not type(first) or (data.dtype != first.dtype and cls.same_dtype):
                    _raise_mismatch(cls, inputs)
            else:
                edges.append(None)
                if type(x) in _PLAIN:        # the common constants (0.5, an axis, None) need no check
                    arrays.append(x)
                elif isinstance(x, np.generic):  # a NumPy scalar (np.sqrt(d)) acts as a Python scalar: it adopts
                    arrays.append(x.item())      # the tensors' dtype instead of promoting float32 to float64
                else:
                    arrays.append(x)
                    if cls.same_dtype and type(x) in _BACKENDS:
                        constants = (constants or []) + [x]
        if first is None:
            raise OpError(f"{cls.__name__}: needs at least one Tensor input, got {[type(x).__name__ for x in inputs]}")
        if constants:
            _check_constants(cls, first, constants)
        backend = node.backend = _BACKENDS[type(first)]
        xp = node.xp = backend.xp
        record = node.recording = requires and enabled
        try:
            out = node.forward(*arrays, **params)
        except (ValueError, IndexError, TypeError) as exc:
            if isinstance(exc, OpError):
                raise
            shapes = ", ".join(str(getattr(x, "shape", type(x).__name__)) for x in inputs)
            raise OpError(f"{cls.__name__}: {exc} (input shapes: {shapes})") from exc
        if node.n_outputs == 1:  # an instance may set its own count in forward (Unbind)
            if type(out) is not backend.array_type:  # NumPy turns 0-d results into scalars
                out = xp.asarray(out)
            box = inputs[0]._version_box if cls.is_view and xp.may_share_memory(out, arrays[0]) else None
            if not record:
                return Tensor._wrap(out, version_box=box)
            result = Tensor._wrap(out, node, 0, box)
            if cls.saves_output:
                node.saved_out = ((weakref.ref(result), result._version_box[0], out),)
        else:
            out = tuple(o if type(o) is backend.array_type else xp.asarray(o) for o in out)
            if not record:
                return tuple(Tensor._wrap(o) for o in out)
            result = tuple(Tensor._wrap(o, node, i) for i, o in enumerate(out))
            node.out_meta = tuple((o.shape, o.dtype) for o in out)
            if cls.saves_output:
                node.saved_out = tuple((weakref.ref(t), t._version_box[0], t.data) for t in result)
        node.next_edges = tuple(edges)
        node.seq = next(_sequence)
        if cls.saves_inputs:
            saved = []
            for i in cls.saves_inputs:
                x = inputs[i]
                saved.append((x, x._version_box[0]) if isinstance(x, Tensor) else (x, 0))
            node.saved = tuple(saved)
        return result

    def release(self):
        """Free what backward saved (called after backward unless retain_graph)."""
        self.saved = None
        self.saved_out = None

    def __repr__(self):
        return f"<{type(self).__name__} node>"


def _raise_modified(node, t, version):
    i = next(i for i, (saved, _) in enumerate(node.saved) if saved is t)
    raise RuntimeError(
        f"{type(node).__name__}: input {i} (shape {t.shape}) was modified in place after it was saved "
        f"for backward (version {version} at forward, {t._version} now); gradients would be wrong. "
        "Use an out-of-place op, or clone the tensor before changing it.")


def _raise_mismatch(cls, inputs):
    tensors = [x for x in inputs if isinstance(x, Tensor)]
    first = tensors[0]
    for t in tensors[1:]:
        if type(t.data) is not type(first.data):
            raise OpError(f"{cls.__name__}: inputs on different devices ({first.device} and {t.device}); "
                          "move them with .to(device)")
        if t.dtype != first.dtype:
            raise OpError(f"{cls.__name__}: dtype mismatch {first.dtype} vs {t.dtype} (shapes {first.shape} and "
                          f"{t.shape}); convert one with .to(dtype=...): disttrain never mixes dtypes silently")


def _check_constants(cls, first, constants):
    """A raw array input must not change the result's dtype (float64 data into a float32 op)."""
    for c in constants:
        if np.result_type(c.dtype, first.dtype) != first.dtype:
            raise OpError(f"{cls.__name__}: dtype mismatch {first.dtype} tensor vs {c.dtype} array (shape {c.shape}); "
                          "wrap the array with dt.tensor(..., dtype=...): disttrain never mixes dtypes silently")


class AccumulateGrad(Function):
    """The node standing for a leaf: adds the final gradient into leaf.grad and fires its hooks."""

    n_outputs = 1

    def __init__(self, leaf):
        self.leaf = leaf
        self.next_edges = ()
        self.seq = float("inf")
        self.saved = ()
        self.saved_out = ()
        self.out_hooks = None

    def accumulate(self, grad, create_graph, given):
        leaf = self.leaf
        if leaf._hooks:
            for hook in leaf._hooks:
                new = hook(grad)
                if new is not None:
                    grad = new
        if not create_graph:
            grad = grad.detach() if grad._node is not None else grad
        if leaf.grad is None:
            leaf.grad = grad if create_graph else Tensor._wrap(_private(grad.data, given))
        else:
            # out of place: a gradient array may be shared with another leaf's (add passes g twice)
            leaf.grad = leaf.grad + grad
        if leaf._post_hooks:
            for hook in leaf._post_hooks:
                hook(leaf)

    def release(self):
        pass


def _private(array, given):
    """`array`, or a copy where it might be shared, for a leaf's .grad to own.

    NOTE: optimizers and clip_grad_norm_ change .grad in place, so it must not be a read-only
    broadcast view (sum's backward), nor share memory with what another leaf received in this
    pass (add passes g to both inputs), with a gradient still waiting in another node's buffer
    (engine._mark_shared) or with the caller's seed gradient. `given` holds the ids of those
    memory owners; only the rare shared case copies, so a GEMM's fresh weight gradient is kept as is.
    """
    owner = array if array.base is None else array.base
    if not array.flags.writeable or id(owner) in given:
        array = array.copy()
        owner = array
    given.add(id(owner))
    return array


def accumulator_of(leaf):
    """The leaf's AccumulateGrad node, shared by every graph that uses the leaf.

    The leaf holds it weakly (the graph holds it strongly), so a leaf and its accumulator form
    no reference cycle.
    """
    ref = leaf._accumulator
    acc = ref() if ref is not None else None
    if acc is None:
        acc = AccumulateGrad(leaf)
        leaf._accumulator = weakref.ref(acc)
    return acc
