"""Loss modules wrapping the functional losses."""
from disttrain.nn import functional as F
from disttrain.nn.module import Module


class CrossEntropyLoss(Module):
    """logits (N, C) or (N, C, d1, ...), int64 targets (N,) or (N, d1, ...) -> a scalar (or per-item losses)."""

    def __init__(self, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, input, target):
        return F.cross_entropy(input, target, ignore_index=self.ignore_index, reduction=self.reduction)


class MSELoss(Module):
    """Mean (or summed) squared difference of two tensors of the same shape."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, input, target):
        return F.mse_loss(input, target, reduction=self.reduction)
