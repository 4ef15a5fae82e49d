"""Elementwise activations as modules (any shape -> same shape)."""
from disttrain.nn import functional as F
from disttrain.nn.module import Module


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
    """GELU, tanh form: torch.nn.GELU(approximate="tanh") (the exact erf form is not available)."""

    def __init__(self, approximate="tanh"):
        super().__init__()
        if approximate != "tanh":
            raise ValueError(f"GELU: approximate={approximate!r} is not available; only the tanh form "
                             "(approximate='tanh') is implemented")
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"
