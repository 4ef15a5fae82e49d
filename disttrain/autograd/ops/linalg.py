"""Matrix product with batch broadcasting (GEMM: NumPy's BLAS on the CPU, cuBLAS via CuPy on the GPU)."""
from disttrain.autograd import grad_mode
from disttrain.autograd.function import Function, OpError
from disttrain.autograd.ops.elementwise import sum_to
from disttrain.tensor.tensor import Tensor


class MatMul(Function):
    """a @ b for a.ndim >= 2 and b.ndim >= 2; leading (batch) dimensions broadcast."""

    saves_inputs = (0, 1)

    def forward(self, a, b):
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"inner dimensions differ: {a.shape} @ {b.shape} "
                             f"({a.shape[-1]} != {b.shape[-2]})")
        return a @ b

    def backward(self, g):
        a, b = self.saved_inputs
        ga = sum_to(g @ b.swapaxes(-1, -2), a.shape) if self.needs_grad(0) else None
        gb = sum_to(a.swapaxes(-1, -2) @ g, b.shape) if self.needs_grad(1) else None
        return ga, gb


class Linear(Function):
    """x (N, in) @ w.T + b with w (out, in), b (out,) or None: PyTorch's addmm layout.

    One node instead of transpose + matmul + add; backward's dW = g.T @ x comes out contiguous
    in w's own layout, so the optimizer updates it without strided access.
    """

    saves_inputs = (0, 1)

    def forward(self, x, w, b):
        if x.ndim != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(f"linear: input {x.shape} does not match weight {w.shape} (expected (N, {w.shape[1]}))")
        return self.backend.kernels.linear_forward(self.xp, x, w, b)

    def backward(self, g):
        x, w = self.saved_inputs
        if grad_mode.is_grad_enabled():  # create_graph: differentiable ops
            return (g @ w if self.needs_grad(0) else None,
                    g.T @ x if self.needs_grad(1) else None,
                    g.sum(axis=0) if self.needs_grad(2) else None)
        g = g.data
        return (Tensor._wrap(g @ w.data) if self.needs_grad(0) else None,
                Tensor._wrap(g.T @ x.data) if self.needs_grad(1) else None,
                # the bias gradient, a column sum, as one GEMV: a fraction of a reduction's time
                Tensor._wrap(self.xp.ones(g.shape[0], dtype=g.dtype) @ g) if self.needs_grad(2) else None)


def linear(x, w, b=None):
    """x (..., in) -> (..., out); leading dimensions fold into one GEMM."""
    if x.ndim == 2:
        return Linear.apply(x, w, b)
    out = Linear.apply(x.reshape((-1, x.shape[-1])), w, b)
    return out.reshape(x.shape[:-1] + (w.shape[0],))


def matmul(a, b):
    """NumPy matmul semantics, including 1-D operands (promoted, then the added axis removed)."""
    from disttrain.tensor.tensor import Tensor

    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"matmul: both operands must be Tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.ndim == 0 or b.ndim == 0:
        raise OpError(f"matmul: operands must have at least one dimension, got shapes {a.shape} and {b.shape}")
    inner_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if a.shape[-1] != inner_b:  # checked here so a 1-D operand is named by its own shape, not the promoted one
        raise OpError(f"MatMul: inner dimensions differ: {a.shape} @ {b.shape} ({a.shape[-1]} != {inner_b})")
    squeeze_a = a.ndim == 1
    squeeze_b = b.ndim == 1
    if squeeze_a:
        a = a.reshape((1, a.shape[0]))
    if squeeze_b:
        b = b.reshape((b.shape[0], 1))
    out = MatMul.apply(a, b)
    if squeeze_a:
        out = out.squeeze(-2)
    if squeeze_b:
        out = out.squeeze(-1)
    return out
