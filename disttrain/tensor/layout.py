"""Memory layouts of arrays: the order in which an array's axes lie in memory, and new arrays laid out in a
given order. A gradient or output laid out as its input was (a transposed view's, say) lets the ops after it
take views where a C-ordered array would have to be copied."""
import numpy as np


def axis_order(a):
    """a's axes from outermost to innermost in memory (by stride, ties in axis order), its last axis last."""
    if a.ndim == 0:
        return ()
    return tuple(sorted(range(a.ndim - 1), key=lambda axis: -abs(a.strides[axis]))) + (a.ndim - 1,)


def empty_in_order(xp, shape, dtype, order):
    """An uninitialised array of `shape` whose axes lie in memory in `order` (as axis_order gives it)."""
    return xp.empty([shape[axis] for axis in order], dtype=dtype).transpose(tuple(np.argsort(order).tolist()))
