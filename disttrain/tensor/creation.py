"""Creation functions: dt.tensor, zeros, ones, full, randn, rand, arange, from_numpy, *_like."""
import numpy as np

from disttrain.tensor import dtypes
from disttrain.tensor.backend import get_backend, CPU
from disttrain.tensor.random import generator
from disttrain.tensor.tensor import Tensor


def _finish(array, dtype, device, requires_grad):
    """Cast on the host, move to the device, wrap."""
    if dtype is not None:
        array = array.astype(dtypes.as_dtype(dtype), copy=False)
    backend = get_backend(device)
    if backend is not CPU:
        array = backend.asarray(array)
    return Tensor(array, requires_grad=requires_grad)


def tensor(data, dtype=None, device="cpu", requires_grad=False):
    """A new leaf tensor holding a copy of `data` (list, scalar, NumPy/CuPy array or Tensor)."""
    if isinstance(data, Tensor):
        data = data.numpy()
    user_array = hasattr(data, "dtype")
    array = np.array(data.get() if hasattr(data, "get") and not isinstance(data, np.ndarray) else data)
    if dtype is None:
        dtype = dtypes.infer_dtype(array, keep_float=user_array)
    return _finish(array.copy(), dtype, device, requires_grad)


def from_numpy(array, requires_grad=False):
    """A CPU tensor sharing memory with `array` (no copy)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"from_numpy expects a NumPy array, got {type(array).__name__}")
    return Tensor(array, requires_grad=requires_grad)


def _shape(shape):
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)


def zeros(*shape, dtype="float32", device="cpu", requires_grad=False):
    return full(_shape(shape), 0, dtype=dtypes.DEFAULT_FLOAT if dtype is None else dtype, device=device,
                requires_grad=requires_grad)


def ones(*shape, dtype="float32", device="cpu", requires_grad=False):
    return full(_shape(shape), 1, dtype=dtypes.DEFAULT_FLOAT if dtype is None else dtype, device=device,
                requires_grad=requires_grad)


def full(shape, fill_value, dtype=None, device="cpu", requires_grad=False):
    """A tensor of `shape` filled with fill_value; without a dtype, the fill value's kind says which, as
    torch.full: bool, int64, or float32 (the default float)."""
    xp = get_backend(device).xp
    dtype = dtypes.fill_dtype(fill_value) if dtype is None else dtypes.as_dtype(dtype)
    array = xp.full(tuple(shape) if not isinstance(shape, int) else (shape,), fill_value, dtype=dtype)
    return Tensor(array, requires_grad=requires_grad)


def zeros_like(t, dtype=None, requires_grad=False):
    return zeros(t.shape, dtype=dtype or t.dtype, device=t.device, requires_grad=requires_grad)


def ones_like(t, dtype=None, requires_grad=False):
    return ones(t.shape, dtype=dtype or t.dtype, device=t.device, requires_grad=requires_grad)


def randn(*shape, dtype="float32", device="cpu", requires_grad=False):
    """Standard normal samples, drawn from the CPU generator so every device sees the same numbers."""
    array = generator(CPU).standard_normal(_shape(shape))
    return _finish(array, dtype, device, requires_grad)


def rand(*shape, dtype="float32", device="cpu", requires_grad=False):
    """Uniform [0, 1) samples from the CPU generator."""
    array = generator(CPU).random(_shape(shape))
    return _finish(array, dtype, device, requires_grad)


def uniform(shape, low, high, dtype="float32", device="cpu", requires_grad=False):
    array = generator(CPU).uniform(low, high, size=tuple(shape))
    return _finish(array, dtype, device, requires_grad)


def randint(low, high, shape, device="cpu"):
    array = generator(CPU).integers(low, high, size=tuple(shape), dtype=np.int64)
    return _finish(array, None, device, False)


def arange(start, stop=None, step=1, dtype=None, device="cpu"):
    if stop is None:
        start, stop = 0, start
    array = np.arange(start, stop, step)
    return _finish(array, dtype or dtypes.infer_dtype(array, keep_float=False), device, False)
