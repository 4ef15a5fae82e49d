"""Gradient clipping, flat-vector views of parameters (torch.nn.utils), and preserved_buffers."""
import contextlib
import math

from disttrain.autograd.grad_mode import no_grad
from disttrain.autograd.ops import concat
from disttrain.tensor.backend import by_backend
from disttrain.tensor.kernels_numpy import CLIP_EPSILON
from disttrain.tensor.tensor import Tensor


def _as_list(parameters):
    return [parameters] if isinstance(parameters, Tensor) else list(parameters)


def grad_norm(grads, norm_type=2.0):
    """The norm of all gradients (Tensors) together, as a float, computed on their backend arrays: as torch's
    clip_grad_norm_, the norm of order norm_type of the per-gradient norms of that order (for order 0 that
    counts the gradients with a nonzero element, not the nonzero elements)."""
    norm_type = norm_order(norm_type, "grad_norm")
    if math.isnan(norm_type):
        return math.nan
    parts = []
    for backend, positions in by_backend(grads):  # the arrays' norms in one kernel call; one host sync per device
        arrays = [grads[k].data for k in positions]
        parts.extend(float(v) for v in backend.kernels.norms(backend.xp, arrays, norm_type).tolist())
    return norm_of_norms(parts, norm_type)


def norm_order(norm_type, where):
    """norm_type as a float (inf, -inf, 0 and negative orders included, as torch's), else a one-line ValueError."""
    try:
        return float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: norm_type={norm_type!r} is not a number; give the order of the vector norm "
                         "as a float (2.0, 1.0, inf, ...)") from None


def norm_of_norms(values, p):
    """torch.linalg.vector_norm of non-negative floats (norms of parts of a whole), order p (NaN: NaN): the norm
    of the whole, as clip_grad_norm_ combines its per-gradient norms."""
    if any(math.isnan(v) for v in values):
        return math.nan
    if p == math.inf:
        return max(values)
    if p == -math.inf:
        return min(values)
    if p == 0:
        return float(sum(v != 0 for v in values))
    terms = [math.inf if v == 0 and p < 0 else v ** p for v in values]  # 0 ** -1 is inf there, not an error
    return math.fsum(terms) ** (1.0 / p)


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, total_norm=None):
    """Scale the gradients in place so that their total norm is at most max_norm; return the norm before.

    The total norm is that of all gradients concatenated into one vector. When it exceeds
    max_norm (or is NaN) every gradient is multiplied by max_norm / (total_norm + 1e-6), as in PyTorch.
    Parameters without a gradient are skipped. total_norm: the norm to clip by, when it was computed
    elsewhere over more gradients than these (a pipeline stage's share of the model: the norm of all
    stages' gradients together), so that every share is scaled as the whole would be.
    """
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    norm_type = norm_order(norm_type, "clip_grad_norm_")
    if total_norm is None and not grads:
        return 0.0
    total = grad_norm(grads, norm_type) if total_norm is None else float(total_norm)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is {total}; "
                           "pass error_if_nonfinite=False to clip anyway")
    coef = float(max_norm) / (total + CLIP_EPSILON)
    if grads and not coef >= 1.0:  # a NaN norm scales every gradient by NaN, as torch's clamp(coef, max=1) does
        with no_grad():
            for g in grads:
                g.begin_inplace("clip_grad_norm_")  # bumps the version, as g.mul_(coef) would
            for backend, positions in by_backend(grads):  # one multi-tensor call per device
                backend.kernels.scale_(backend.xp, [grads[k].data for k in positions], coef)
    return total


def parameters_to_vector(parameters):
    """All parameters flattened and concatenated, in order, into one 1-D tensor (differentiable)."""
    return concat([p.reshape((-1,)) for p in _as_list(parameters)], axis=0)


def vector_to_parameters(vec, parameters):
    """Copy consecutive slices of the 1-D `vec` into the parameters, in place (the inverse of the above)."""
    params = _as_list(parameters)
    total = sum(p.numel() for p in params)
    if vec.ndim != 1 or vec.shape[0] != total:
        raise ValueError(f"vector_to_parameters: expected a 1-D vector of {total} elements, got shape {vec.shape}")
    start = 0
    with no_grad():
        for p in params:
            n = p.numel()
            p.copy_(vec.data[start:start + n].reshape(p.shape))
            start += n


@contextlib.contextmanager
def preserved_buffers(module):
    """On leaving the block, every buffer of `module` (persistent or not) is the tensor it was on entering, with
    the values it had: for a measuring or profiling forward in training mode, which must not count as a step
    (running statistics, counters)."""
    saved = [(owner, name, buffer, None if buffer is None else buffer.data.copy())
             for _, owner in module.named_modules() for name, buffer in owner._buffers.items()]
    try:
        yield
    finally:
        for owner, name, buffer, values in saved:
            owner._buffers[name] = buffer
            if buffer is not None:
                buffer.data[...] = values
