"""Fused kernels written with the array module: the CPU implementation and the reference that
every CUDA kernel in disttrain/kernels_cuda is tested against.

Each function takes and returns raw arrays (xp = numpy or cupy) and documents its layout.
"""


def sigmoid(xp, a):
    e = xp.exp(-xp.abs(a))  # exp of a non-positive number only: no overflow
    return xp.where(a >= 0, 1 / (1 + e), e / (1 + e)).astype(a.dtype, copy=False)


def lstm_cell_forward(xp, gates_x, h, c, w_hh):
    """One LSTM step.

    gates_x (B, 4H): input projection x_t @ W_ih^T + b_ih + b_hh, gate order i, f, g, o (PyTorch's)
    h, c (B, H): previous hidden and cell state;  w_hh (4H, H)
    Returns h_new, c_new (B, H) and the activations backward needs: acts (B, 4H) = [i, f, g, o], tanh_c (B, H).
    """
    hidden = h.shape[1]
    pre = gates_x + h @ w_hh.T
    acts = xp.empty_like(pre)
    acts[:, :2 * hidden] = sigmoid(xp, pre[:, :2 * hidden])
    acts[:, 2 * hidden:3 * hidden] = xp.tanh(pre[:, 2 * hidden:3 * hidden])
    acts[:, 3 * hidden:] = sigmoid(xp, pre[:, 3 * hidden:])
    i, f, g, o = (acts[:, k * hidden:(k + 1) * hidden] for k in range(4))
    c_new = f * c + i * g
    tanh_c = xp.tanh(c_new)
    return o * tanh_c, c_new, acts, tanh_c


def lstm_cell_backward(xp, dh, dc, acts, tanh_c, h, c, w_hh):
    """Gradients of one LSTM step: returns d_gates_x (B, 4H), dh_prev, dc_prev (B, H), dw_hh (4H, H)."""
    hidden = h.shape[1]
    i, f, g, o = (acts[:, k * hidden:(k + 1) * hidden] for k in range(4))
    dc_total = dc + dh * o * (1 - tanh_c * tanh_c)
    dpre = xp.empty_like(acts)
    dpre[:, :hidden] = dc_total * g * i * (1 - i)
    dpre[:, hidden:2 * hidden] = dc_total * c * f * (1 - f)
    dpre[:, 2 * hidden:3 * hidden] = dc_total * i * (1 - g * g)
    dpre[:, 3 * hidden:] = dh * tanh_c * o * (1 - o)
    return dpre, dpre @ w_hh, dc_total * f, dpre.T @ h
