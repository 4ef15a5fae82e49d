"""Elementwise ops with NumPy broadcasting; broadcast gradients are summed back to each input's shape."""
import math

import numpy as np

from disttrain.autograd import grad_mode
from disttrain.autograd.function import Function
from disttrain.tensor import kernels_numpy
from disttrain.tensor.dtypes import as_torch_promotes
from disttrain.tensor.tensor import Tensor


def sum_to(g, shape):
    """Sum a broadcast gradient back to `shape` (the inverse of broadcasting)."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape) if g.shape != shape else g


def _shape(x):
    return x.shape if isinstance(x, Tensor) else ()


def _array(x):
    """A saved input as a raw operand: a tensor's array, or a constant as Function.apply passed it."""
    if isinstance(x, Tensor):
        return x.data
    return x.item() if isinstance(x, np.generic) else x


def _array_grad(g, x):
    """A raw gradient array as input x's gradient: summed back to x's shape, wrapped into a Tensor."""
    shape = x.data.shape
    if g.shape != shape:
        lead = g.ndim - len(shape)
        axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
        g = (g.sum(axis=axes, keepdims=True) if axes else g).reshape(shape)
    return _wrap_array(g)


def _wrap_array(a):
    """A raw result as a Tensor: NumPy turns 0-d results into scalars, a tensor holds an array."""
    return Tensor._wrap(np.asarray(a) if isinstance(a, np.generic) else a)


class Add(Function):
    def forward(self, a, b):
        self.shapes = (getattr(a, "shape", ()), getattr(b, "shape", ()))
        return as_torch_promotes(a + b, a, b)

    def backward(self, g):
        sa, sb = self.shapes
        edge_a, edge_b = self.next_edges  # an input needs a gradient where its edge is not None
        return (sum_to(g, sa) if edge_a is not None else None,
                sum_to(g, sb) if edge_b is not None else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = (getattr(a, "shape", ()), getattr(b, "shape", ()))
        return as_torch_promotes(a - b, a, b)

    def backward(self, g):
        sa, sb = self.shapes
        edge_a, edge_b = self.next_edges
        return (sum_to(g, sa) if edge_a is not None else None,
                sum_to(-g, sb) if edge_b is not None else None)


class Mul(Function):
    saves_inputs = (0, 1)

    def forward(self, a, b):
        return as_torch_promotes(a * b, a, b)

    def backward(self, g):
        a, b = self.saved_inputs
        edge_a, edge_b = self.next_edges
        if grad_mode.state.enabled:  # create_graph: differentiable ops
            return (sum_to(g * b, _shape(a)) if edge_a is not None else None,
                    sum_to(g * a, _shape(b)) if edge_b is not None else None)
        g = g.data  # on the arrays, no nodes (the hottest backward); an input with an edge is a Tensor
        return (_array_grad(g * _array(b), a) if edge_a is not None else None,
                _array_grad(g * _array(a), b) if edge_b is not None else None)


class Div(Function):
    saves_inputs = (0, 1)

    def forward(self, a, b):
        return as_torch_promotes(a / b, a, b)

    def backward(self, g):
        a, b = self.saved_inputs
        ga = sum_to(g / b, _shape(a)) if self.needs_grad(0) else None
        gb = sum_to(-g * a / (b * b), _shape(b)) if self.needs_grad(1) else None
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return -g


class Pow(Function):
    """a ** b for a tensor base and a scalar or tensor exponent (or a scalar base, tensor exponent)."""

    saves_inputs = (0, 1)
    saves_output = True

    def forward(self, a, b):
        return as_torch_promotes(a ** b, a, b)

    def backward(self, g):
        # NOTE: zero where torch's is, not the NaN of the formulas: d/da where b == 0 (0 * 0 ** -1), d/db
        # where a == 0 and b >= 0 (0 * log 0)
        a, b = self.saved_inputs
        ga = gb = None
        if self.needs_grad(0):
            if not isinstance(b, Tensor) and np.ndim(b) == 0 and b == 0:  # a constant exponent 0: x ** 0 is 1
                ga = Tensor._wrap(self.xp.zeros(a.shape, dtype=g.dtype))
            else:
                ga = sum_to(_zero_where(_array(b) == 0, g * b * a ** (b - 1)), a.shape)
        if self.needs_grad(1):
            log_a = a.log() if isinstance(a, Tensor) else (math.log(a) if a > 0 else _log_nonpositive(a))
            gb = g * self.output() * log_a
            gb = sum_to(_zero_where((_array(a) == 0) & (_array(b) >= 0), gb), _shape(b))
        return ga, gb


def _zero_where(mask, value):
    """value with zeros where mask (a bool, or a boolean array broadcasting with value) holds."""
    if mask is True or mask is False:  # from constant operands
        return Tensor._wrap(value.backend.xp.zeros(value.shape, dtype=value.dtype)) if mask else value
    return where(mask, 0.0, value)


def _log_nonpositive(a):
    """log of a constant base <= 0 as NumPy gives it: -inf at 0, NaN below (math.log raises there)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.log(a))


class Exp(Function):
    saves_output = True

    def forward(self, a):
        return self.xp.exp(a)

    def backward(self, g):
        return g * self.output()


class Log(Function):
    saves_inputs = (0,)

    def forward(self, a):
        return self.xp.log(a)

    def backward(self, g):
        (a,) = self.saved_inputs
        return g / a


class Tanh(Function):
    saves_output = True

    def forward(self, a):
        return self.xp.tanh(a)

    def backward(self, g):
        if not grad_mode.state.enabled:  # no create_graph: one kernel on the arrays, no nodes
            return _wrap_array(self.backend.kernels.bias_act_backward(self.xp, g.data, self.output_data(), "tanh")[0])
        y = self.output()
        return g * (1 - y * y)


class Sigmoid(Function):
    saves_output = True

    def forward(self, a):
        return self.backend.kernels.sigmoid(self.xp, a)

    def backward(self, g):
        if not grad_mode.state.enabled:  # no create_graph: one kernel on the arrays, no nodes
            return _wrap_array(self.backend.kernels.bias_act_backward(self.xp, g.data, self.output_data(),
                                                                      "sigmoid")[0])
        y = self.output()
        return g * (y * (1 - y))


class Relu(Function):
    def forward(self, a):
        self.mask = a > 0
        # maximum, not a * mask: a float-by-bool product runs NumPy's slower mixed-type loop (NaN stays NaN either way)
        return self.xp.maximum(a, 0)

    def backward(self, g):
        return g * Tensor._wrap(self.xp.asarray(self.mask, dtype=g.dtype))  # asarray: 0-d masks are scalars


class Gelu(Function):
    """GELU, torch's gelu: approximate="none", the exact x Phi(x) (Phi the standard normal CDF, through erf),
    or approximate="tanh", 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the form GPT-2 uses. Forward and
    backward are one kernel each (kernels_numpy.gelu_erf_forward / gelu_forward and their backwards);
    backward recomputes from the saved input instead of keeping a second activation (an MLP's hidden layer
    is the largest activation of a Transformer block)."""

    saves_inputs = (0,)

    def forward(self, a, approximate):
        self.tanh_form = approximate == "tanh"
        kernels = self.backend.kernels
        return (kernels.gelu_forward if self.tanh_form else kernels.gelu_erf_forward)(self.xp, a)

    def backward(self, g):
        (x,) = self.saved_inputs
        if grad_mode.state.enabled:  # create_graph: differentiable ops
            if not self.tanh_form:
                return g * (NormalCdf.apply(x) + x * (x * x * -0.5).exp() * kernels_numpy.INV_SQRT_2PI)
            s, k = kernels_numpy.GELU_SCALE, kernels_numpy.GELU_CUBIC
            t = (s * (x + k * x * x * x)).tanh()
            return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * s * (1 + 3 * k * x * x))
        kernels = self.backend.kernels
        backward = kernels.gelu_backward if self.tanh_form else kernels.gelu_erf_backward
        return _wrap_array(backward(self.xp, g.data, x.data))


class NormalCdf(Function):
    """Phi(x), the standard normal CDF (kernels_numpy.normal_cdf): the exact GELU's double backward."""

    saves_inputs = (0,)

    def forward(self, a):
        return self.backend.kernels.normal_cdf(self.xp, a)

    def backward(self, g):
        (x,) = self.saved_inputs
        return g * ((x * x * -0.5).exp() * kernels_numpy.INV_SQRT_2PI)


class Abs(Function):
    def forward(self, a):
        self.sign = self.xp.sign(a)
        return self.xp.abs(a)

    def backward(self, g):
        return g * Tensor._wrap(self.xp.asarray(self.sign))


class Maximum(Function):
    """Elementwise max; where a == b the gradient is split evenly between the two (as PyTorch)."""

    def forward(self, a, b):
        self.shapes = (getattr(a, "shape", ()), getattr(b, "shape", ()))
        xp = self.xp
        self.weight_a = (a > b) + 0.5 * (a == b)
        return xp.maximum(a, b)

    def backward(self, g):
        wa = Tensor._wrap(self.xp.asarray(self.weight_a, dtype=g.dtype))
        sa, sb = self.shapes
        return (sum_to(g * wa, sa) if self.needs_grad(0) else None,
                sum_to(g * (1 - wa), sb) if self.needs_grad(1) else None)


class Where(Function):
    """where(cond, a, b): cond is a constant boolean array."""

    same_dtype = False

    def forward(self, cond, a, b):
        self.cond = cond
        self.shapes = (getattr(a, "shape", ()), getattr(b, "shape", ()))
        return self.xp.where(cond, a, b)

    def backward(self, g):
        zero = g * 0
        c = Tensor._wrap(self.xp.asarray(self.cond))
        sa, sb = self.shapes
        return (None,
                sum_to(where(c, g, zero), sa) if self.needs_grad(1) else None,
                sum_to(where(c, zero, g), sb) if self.needs_grad(2) else None)


class Clip(Function):
    """Clamp to [lo, hi]; the gradient flows where lo <= a <= hi (bounds inclusive, as PyTorch)."""

    def forward(self, a, lo, hi):
        xp = self.xp
        inside = xp.ones(a.shape, dtype=bool)
        if lo is not None:
            inside &= a >= lo
        if hi is not None:
            inside &= a <= hi
        self.inside = inside
        return xp.clip(a, lo, hi)

    def backward(self, g):
        return g * Tensor._wrap(self.inside.astype(g.dtype)), None, None


def maximum(a, b):
    return Maximum.apply(a, b)


def minimum(a, b):
    """Elementwise min; where a == b the gradient is split evenly, as torch.minimum."""
    return -Maximum.apply(-a, -b)


def where(cond, a, b):
    cond = cond.data if isinstance(cond, Tensor) else cond
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        raise TypeError("where: at least one of a, b must be a Tensor")
    return Where.apply(cond, a, b)
