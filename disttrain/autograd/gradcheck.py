"""Numerical gradient checks: central differences in float64 against the engine's gradients.

The check projects the outputs on a fixed random direction v and compares d<v, f(x)>/dx
computed by backward with (f(x + eps e_i) - f(x - eps e_i)) / 2 eps for every input element i.
A random v makes a wrong Jacobian entry show up with probability one, at the cost of one
backward instead of one per output element.
"""
import numpy as np

from disttrain.autograd.engine import grad
from disttrain.tensor.tensor import Tensor


class GradcheckError(AssertionError):
    pass


def _as_outputs(out):
    return [out] if isinstance(out, Tensor) else [o for o in out if isinstance(o, Tensor)]


def _projection(fn, inputs, directions):
    outs = _as_outputs(fn(*inputs))  # grad mode left on: gradgradcheck's fn itself calls grad()
    return sum(float((o.numpy().astype(np.float64) * v).sum()) for o, v in zip(outs, directions))


def gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, seed=0, raise_exception=True):
    """Compare analytical and numerical gradients of fn(*inputs) w.r.t. every float64 input requiring grad.

    Returns True, or raises GradcheckError naming the input, the element and both values.
    """
    inputs = list(inputs)
    wrt = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    for i in wrt:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} has dtype {inputs[i].dtype}; use float64 for a meaningful check")
    rng = np.random.default_rng(seed)
    outs = _as_outputs(fn(*inputs))
    directions = [rng.standard_normal(o.shape) for o in outs]
    seeds = [Tensor._wrap(o.backend.asarray(v, dtype=o.dtype)) for o, v in zip(outs, directions)]
    live = [(o, s) for o, s in zip(outs, seeds) if o.requires_grad]  # others are constant in the inputs
    analytic = (grad([o for o, _ in live], [inputs[i] for i in wrt], [s for _, s in live], allow_unused=True)
                if live else [None] * len(wrt))
    for i, g in zip(wrt, analytic):
        x = inputs[i]
        g = np.zeros(x.shape) if g is None else g.numpy()
        numeric = _numeric_grad(fn, inputs, x, directions, eps)
        bad = ~np.isclose(g, numeric, atol=atol, rtol=rtol)
        if bad.any():
            where = tuple(int(k) for k in np.argwhere(bad)[0])
            msg = (f"gradcheck: input {i} (shape {x.shape}) element {where}: analytical {g[where]:.10g} vs "
                   f"numerical {numeric[where]:.10g}; max abs difference {np.abs(g - numeric).max():.3g}")
            if raise_exception:
                raise GradcheckError(msg)
            return False
    return True


def _numeric_grad(fn, inputs, x, directions, eps):
    flat = x.data.reshape(-1)  # a view: perturb in place, restore after
    out = np.zeros(flat.size)
    for k in range(flat.size):
        orig = flat[k].item()
        flat[k] = orig + eps
        plus = _projection(fn, inputs, directions)
        flat[k] = orig - eps
        minus = _projection(fn, inputs, directions)
        flat[k] = orig
        out[k] = (plus - minus) / (2 * eps)
    return out.reshape(x.shape)


def gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, seed=1):
    """Check second derivatives: gradcheck of the (create_graph) gradient of <v, fn(*inputs)>."""
    rng = np.random.default_rng(seed)
    wrt = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    outs = _as_outputs(fn(*inputs))
    directions = [rng.standard_normal(o.shape) for o in outs]

    def first_grads(*xs):
        outs = _as_outputs(fn(*xs))
        seeds = [Tensor._wrap(o.backend.asarray(v, dtype=o.dtype)) for o, v in zip(outs, directions)]
        return grad(outs, [xs[i] for i in wrt], seeds, create_graph=True, allow_unused=True)

    return gradcheck(lambda *xs: [g for g in first_grads(*xs) if g is not None], inputs, eps, atol, rtol, seed)
