"""Dropout: random zeroing while training, identity in eval mode."""
from disttrain.nn import functional as F
from disttrain.nn.module import Module


class Dropout(Module):
    """Any shape -> same shape. In training mode each element is zeroed with probability p and the
    rest are scaled by 1/(1-p), with masks from the generator of the input's device; after
    model.eval() it passes the input through unchanged."""

    def __init__(self, p=0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"
