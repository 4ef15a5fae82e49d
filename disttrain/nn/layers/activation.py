"""Elementwise activations as modules (any shape -> same shape)."""
from disttrain.nn import functional as F
from disttrain.nn.module import Module
from disttrain.tensor.kernels_numpy import check_gelu_approximate


class ReLU(Module):
    """max(x, 0)."""

    def forward(self, x):
        return F.relu(x)


class Tanh(Module):
    def forward(self, x):
        return F.tanh(x)


class Sigmoid(Module):
    """1 / (1 + exp(-x))."""

    def forward(self, x):
        return F.sigmoid(x)


class GELU(Module):
    """torch.nn.GELU: x Phi(x) by default (approximate="none"), the tanh form with approximate="tanh"."""

    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = check_gelu_approximate(approximate, "GELU")

    def forward(self, x):
        return F.gelu(x, self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"
