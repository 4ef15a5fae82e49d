"""Op observers: be told about every Function.apply, for profilers and the memory meter.

    def on_op(call):                      # an OpCall
        print(call.op.__name__, call.seconds, [o.shape for o in call.outputs])

    with observe_ops(on_op):              # or: handle = add_op_observer(on_op) ... handle.remove()
        loss = model(x)

An observer is called after each op's forward returned, with the op class, the recorded graph
node (None when nothing was recorded: grad mode off, or no input requiring grad), the inputs as
passed, the output tensors, perf_counter() readings around the whole apply and the nesting depth:
0 for an op called from user code or a backward formula, 1 or more for ops that run inside
another op's forward (a checkpointed function's first run). Observers run in registration order,
in the thread that applied the op; an exception from one propagates to the op's caller.

NOTE: with no observer registered, Function.apply pays one flag check (`state.active`). With
one, apply hands the call to `observed_apply`, which calls Function.apply again to do the work;
a per-thread token tells that inner call to skip the observer branch once, so the op's own
nested ops are observed as usual and nothing rewrites Function.apply.
"""
import threading
import time
from contextlib import contextmanager

from disttrain.autograd.hooks import RemovableHandle


class _State:
    """The flag Function.apply reads: True while at least one observer is registered."""

    active = False


state = _State()
_observers = []
_local = threading.local()  # .bypass: the next apply in this thread is observed_apply's own; .depth


class OpCall:
    """What an observer is told about one Function.apply."""

    __slots__ = ("op", "node", "inputs", "outputs", "start", "stop", "depth")

    def __init__(self, op, node, inputs, outputs, start, stop, depth):
        self.op = op                # the Function subclass
        self.node = node            # the recorded graph node, or None
        self.inputs = inputs        # tuple, as passed to apply (tensors and constants)
        self.outputs = outputs      # tuple of output tensors
        self.start = start          # time.perf_counter() before the op began
        self.stop = stop            # ... and after its outputs were made
        self.depth = depth          # enclosing applies (0: not inside another op's forward)

    @property
    def seconds(self):
        return self.stop - self.start

    def __repr__(self):
        return f"OpCall({self.op.__name__}, depth={self.depth}, {self.seconds * 1e6:.1f} us)"


def add_op_observer(observer):
    """Call observer(OpCall) after every Function.apply from now on; returns a handle with remove()."""
    if not callable(observer):
        raise TypeError(f"add_op_observer: expected a callable taking an OpCall, got {type(observer).__name__}")
    _observers.append(observer)
    state.active = True
    return _ObserverHandle(observer)


class _ObserverHandle(RemovableHandle):
    def __init__(self, observer):
        super().__init__(_observers, observer)

    def remove(self):
        super().remove()
        state.active = bool(_observers)


@contextmanager
def observe_ops(observer):
    """add_op_observer for the duration of a with-block."""
    handle = add_op_observer(observer)
    try:
        yield handle
    finally:
        handle.remove()


def take_bypass():
    """True once for the apply that observed_apply made in this thread (it runs unobserved)."""
    if getattr(_local, "bypass", False):
        _local.bypass = False
        return True
    return False


def observed_apply(cls, inputs, params):
    """cls.apply(*inputs, **params), reported to every observer."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    start = time.perf_counter()
    try:
        _local.bypass = True
        result = cls.apply(*inputs, **params)
    finally:
        _local.bypass = False  # forward may have raised before the inner apply took the token
        _local.depth = depth
    stop = time.perf_counter()
    outputs = result if type(result) is tuple else (result,)
    node = outputs[0].grad_fn if outputs else None
    call = OpCall(cls, node, inputs, outputs, start, stop, depth)
    for observer in tuple(_observers):
        observer(call)
    return result
