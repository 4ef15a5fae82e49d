"""LSTM ops: the fused cell (one time step in one node) and the fused layer (T steps in one node).

Forward and backward call the backend's fused kernels (NumPy on the CPU, our CUDA kernels on
the GPU). The hand-written backwards are checked against the same computation composed of basic
ops (`lstm_cell_reference`, `lstm_layer_reference`); under create_graph a backward differentiates
that composition, so higher-order gradients need no second hand-written formula.
"""
from disttrain.autograd import grad_mode
from disttrain.autograd.function import Function
from disttrain.autograd.ops.elementwise import Sigmoid
from disttrain.autograd.ops.linalg import linear
from disttrain.autograd.ops.shape import stack, unbind
from disttrain.tensor.tensor import Tensor


def _composed_grads(reference, inputs, outputs_grads):
    """create_graph backward: the gradients of `reference(*inputs)`, themselves differentiable."""
    from disttrain.autograd.engine import grad

    outputs = reference(*inputs)
    return grad(list(outputs), list(inputs), list(outputs_grads), create_graph=True, allow_unused=True)


class LSTMCell(Function):
    """(gates_x (B, 4H), h (B, H), c (B, H), w_hh (4H, H)) -> (h_new, c_new); gate order i, f, g, o."""

    saves_inputs = (0, 1, 2, 3)
    n_outputs = 2

    def forward(self, gates_x, h, c, w_hh):
        if gates_x.shape[1] != 4 * h.shape[1] or w_hh.shape != (4 * h.shape[1], h.shape[1]) or h.shape != c.shape:
            raise ValueError(f"shapes do not fit an LSTM cell: gates_x {gates_x.shape}, h {h.shape}, c {c.shape}, "
                             f"w_hh {w_hh.shape} (expected (B, 4H), (B, H), (B, H), (4H, H))")
        h_new, c_new, acts, tanh_c = self.backend.kernels.lstm_cell_forward(self.xp, gates_x, h, c, w_hh)
        if self.recording:
            self.acts, self.tanh_c = acts, tanh_c
        return h_new, c_new

    def backward(self, dh, dc):
        inputs = self.saved_inputs
        if grad_mode.is_grad_enabled():
            return _composed_grads(lstm_cell_reference, inputs, (dh, dc))
        _, h, c, w_hh = (t.data for t in inputs)
        grads = self.backend.kernels.lstm_cell_backward(self.xp, dh.data, dc.data, self.acts, self.tanh_c, h, c, w_hh)
        return tuple(Tensor._wrap(g) if self.needs_grad(k) else None for k, g in enumerate(grads))

    def release(self):
        super().release()
        self.acts = self.tanh_c = None


class LSTMLayer(Function):
    """(x (T, B, in), h0, c0 (B, H), w_ih (4H, in), w_hh (4H, H), b_ih, b_hh (4H,)) -> (out (T, B, H), h_T, c_T).

    One node for a whole layer: the input projection of all steps is one GEMM, the recurrence
    runs inside the backend's kernels with no per-step graph nodes, and backward's weight
    gradients are one GEMM each over all steps.
    """

    saves_inputs = (0, 1, 2, 3, 4, 5, 6)  # the biases only for the create_graph recomputation
    saves_output = True                   # out: h_{t-1} of every step, for dW_hh
    n_outputs = 3

    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        hidden = w_hh.shape[1]
        if (x.ndim != 3 or x.shape[0] == 0 or w_ih.shape != (4 * hidden, x.shape[2])
                or w_hh.shape != (4 * hidden, hidden) or h0.shape != (x.shape[1], hidden) or c0.shape != h0.shape
                or b_ih.shape != (4 * hidden,) or b_hh.shape != (4 * hidden,)):
            raise ValueError(f"shapes do not fit an LSTM layer: x {x.shape}, h0 {h0.shape}, c0 {c0.shape}, "
                             f"w_ih {w_ih.shape}, w_hh {w_hh.shape}, b_ih {b_ih.shape}, b_hh {b_hh.shape} (expected "
                             "(T >= 1, B, in), (B, H), (B, H), (4H, in), (4H, H), (4H,), (4H,))")
        steps, batch, features = x.shape
        gates_x = self.backend.kernels.linear_forward(self.xp, x.reshape(steps * batch, features), w_ih, b_ih + b_hh)
        out, cs, acts, tanh_c = self.backend.kernels.lstm_layer_forward(
            self.xp, gates_x.reshape(steps, batch, 4 * hidden), h0, c0, w_hh)
        if self.recording:
            self.acts, self.cs, self.tanh_c = acts, cs, tanh_c
        return out, out[-1].copy(), cs[-1].copy()

    def backward(self, d_out, dh_n, dc_n):
        inputs = self.saved_inputs
        if grad_mode.is_grad_enabled():
            return _composed_grads(lstm_layer_reference, inputs, (d_out, dh_n, dc_n))
        x, h0, c0, w_ih, w_hh = (t.data for t in inputs[:5])
        out = self.output(0).data  # checked: not modified in place since forward
        d_gates, dh0, dc0, dw_hh = self.backend.kernels.lstm_layer_backward(
            self.xp, d_out.data, dh_n.data, dc_n.data, self.acts, self.tanh_c, out, self.cs, h0, c0, w_hh)
        steps, batch, features = x.shape
        d_gates = d_gates.reshape(steps * batch, w_hh.shape[0])
        dx = (d_gates @ w_ih).reshape(x.shape) if self.needs_grad(0) else None
        dw_ih = d_gates.T @ x.reshape(steps * batch, features) if self.needs_grad(3) else None
        db_ih = db_hh = None
        if self.needs_grad(5) or self.needs_grad(6):
            db_ih = self.xp.ones(steps * batch, dtype=d_gates.dtype) @ d_gates  # a column sum as one GEMV
            db_hh = db_ih.copy() if self.needs_grad(5) and self.needs_grad(6) else db_ih
        grads = (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh)
        return tuple(Tensor._wrap(g) if g is not None and self.needs_grad(k) else None for k, g in enumerate(grads))

    def release(self):
        super().release()
        self.acts = self.cs = self.tanh_c = None


def lstm_cell(gates_x, h, c, w_hh):
    return LSTMCell.apply(gates_x, h, c, w_hh)


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """One LSTM layer over x (T, B, in) from (h0, c0) (B, H): returns (out (T, B, H), h_T, c_T)."""
    return LSTMLayer.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh)


def lstm_cell_reference(gates_x, h, c, w_hh):
    """The same step from basic differentiable ops (the oracle for the fused cell)."""
    hidden = h.shape[1]
    pre = gates_x + h @ w_hh.T
    i = Sigmoid.apply(pre[:, :hidden])
    f = Sigmoid.apply(pre[:, hidden:2 * hidden])
    g = pre[:, 2 * hidden:3 * hidden].tanh()
    o = Sigmoid.apply(pre[:, 3 * hidden:])
    c_new = f * c + i * g
    return o * c_new.tanh(), c_new


def lstm_layer_reference(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """The same layer as one input-projection GEMM and T fused cells (the oracle for the fused layer)."""
    steps, batch, features = x.shape
    gates_x = linear(x.reshape((steps * batch, features)), w_ih, b_ih + b_hh).reshape((steps, batch, w_hh.shape[0]))
    outputs = []
    for gx in unbind(gates_x, 0):
        h, c = lstm_cell(gx, h, c, w_hh)
        outputs.append(h)
    return stack(outputs), h, c
