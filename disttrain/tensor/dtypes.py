"""Data types and the one rule for mixing them.

The rule (documented in docs/ARCHITECTURE.md): every tensor input of an arithmetic op must have
the same dtype; Python scalars take the dtype of the tensor they meet, except where torch's type
promotion changes an integer or bool tensor's result (as_torch_promotes): with a Python float, or in a
true division, it is the default float dtype (float32); bool ** int is int64. Mixing float32 with
float64 is an error, not a silent upcast, because an accidental float64 tensor halves the
speed of a float32 model and a silent downcast ruins a float64 gradient check.
Integer tensors (int64) are indices: they feed indexing, embedding and losses, not arithmetic
with float tensors.
"""
import numpy as np

float32 = np.dtype("float32")
float64 = np.dtype("float64")
int64 = np.dtype("int64")
int32 = np.dtype("int32")
bool_ = np.dtype("bool")
_INT8 = np.dtype("int8")

_ALLOWED = {float32, float64, int64, int32, bool_, np.dtype("float16")}
DEFAULT_FLOAT = float32


def as_dtype(dtype):
    """Normalise a dtype given as a string, NumPy type or dtype; reject what we do not support."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"unknown dtype {dtype!r}; use one of {sorted(str(d) for d in _ALLOWED)}") from exc
    if dt not in _ALLOWED:
        raise TypeError(f"unsupported dtype {dt}; use one of {sorted(str(d) for d in _ALLOWED)}")
    return dt


def infer_dtype(array, keep_float):
    """The dtype a new tensor gets without an explicit dtype.

    Floats become float32, except that an array handed in by the user keeps its float dtype
    (keep_float), as torch.tensor(ndarray) does; ints become int64; bools stay bool.
    """
    kind = array.dtype.kind
    if kind == "f":
        return array.dtype if keep_float else DEFAULT_FLOAT
    if kind in "iu":
        return int64
    if kind == "b":
        return bool_
    raise TypeError(f"cannot make a tensor from data of dtype {array.dtype}")


def as_torch_promotes(out, a, b):
    """`out`, the result of a + - * / ** on a and b (arrays or Python scalars), in the dtype torch's type
    promotion gives where NumPy's differs: NumPy makes float64 of an integer or bool array with a Python float
    or in a true division (int * 0.5, int / int), torch the default float; NumPy makes int8 of bool ** int,
    torch int64. A float32 result, the hot path, passes after two identity checks."""
    dtype = out.dtype
    if dtype is float64:
        if getattr(a, "dtype", None) is float64 or getattr(b, "dtype", None) is float64:
            return out
        return out.astype(DEFAULT_FLOAT)
    if dtype is _INT8 and getattr(a, "dtype", None) is bool_ and type(b) is int:
        return out.astype(int64)
    return out


def fill_dtype(fill_value):
    """The dtype full() gives `fill_value` without a dtype, as torch.full: bool for a bool, int64 for an
    integer, the default float for a float."""
    return infer_dtype(np.asarray(fill_value), keep_float=False)


def is_floating(dtype):
    return dtype.kind == "f"
