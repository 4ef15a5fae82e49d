"""The fused LSTM cell: gates, cell update and output of one time step in one node.

Forward and backward call the backend's fused kernels (NumPy on the CPU, our CUDA kernels on
the GPU). The hand-written backward is checked against `lstm_cell_reference`, the same step
composed of basic ops; under create_graph the backward differentiates that composition, so
higher-order gradients need no second hand-written formula.
"""
from disttrain.autograd import grad_mode
from disttrain.autograd.function import Function
from disttrain.autograd.ops.elementwise import Sigmoid
from disttrain.tensor.tensor import Tensor


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
        if grad_mode.is_grad_enabled():  # create_graph: differentiate the composed step
            from disttrain.autograd.engine import grad

            h_new, c_new = lstm_cell_reference(*inputs)
            return grad([h_new, c_new], list(inputs), [dh, dc], create_graph=True, allow_unused=True)
        _, h, c, w_hh = (t.data for t in inputs)
        grads = self.backend.kernels.lstm_cell_backward(self.xp, dh.data, dc.data, self.acts, self.tanh_c, h, c, w_hh)
        return tuple(Tensor._wrap(g) if self.needs_grad(k) else None for k, g in enumerate(grads))

    def release(self):
        super().release()
        self.acts = self.tanh_c = None


def lstm_cell(gates_x, h, c, w_hh):
    return LSTMCell.apply(gates_x, h, c, w_hh)


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
