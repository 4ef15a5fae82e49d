"""Parameter: a leaf Tensor that a Module registers as trainable state."""
import copy

import numpy as np

from disttrain.tensor import dtypes
from disttrain.tensor.backend import BACKEND_OF_ARRAY_TYPE
from disttrain.tensor.creation import tensor as _new_tensor
from disttrain.tensor.tensor import Tensor


class Parameter(Tensor):
    """A leaf tensor that requires grad (float dtypes only) and is found by Module.parameters().

    Parameter(t) shares t's array (as torch.nn.Parameter does); a NumPy or CuPy array is used
    as is; anything else (a list, a scalar) is copied into a new float32 array.
    Every engine path that takes a Tensor takes a Parameter.
    """

    __slots__ = ()

    def __init__(self, data=None, requires_grad=True):
        super().__init__(_as_array(data), requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()

    def __reduce_ex__(self, protocol):
        # Tensor's slots hold a weakref to the autograd accumulator: pickle the array and flag only
        return (_rebuild_parameter, (self.data, self.requires_grad))

    def __deepcopy__(self, memo):
        result = Parameter(copy.deepcopy(self.data, memo), self.requires_grad)
        if self.grad is not None:
            result.grad = Tensor._wrap(self.grad.data.copy())
        memo[id(self)] = result
        return result


def _as_array(data):
    if data is None:
        return np.empty((0,), dtype=dtypes.DEFAULT_FLOAT)
    if isinstance(data, Tensor):
        return data.data
    if type(data) in BACKEND_OF_ARRAY_TYPE:
        return data
    return _new_tensor(data, dtype=dtypes.DEFAULT_FLOAT).data


def _rebuild_parameter(data, requires_grad):
    return Parameter(data, requires_grad)
