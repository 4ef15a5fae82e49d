"""Pooling layers: MaxPool2d and AvgPool2d over (N, C, H, W) windows."""
from disttrain.nn import functional as F
from disttrain.nn.module import Module


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """(N, C, H, W) -> (N, C, OH, OW): the max of each window (stride defaults to kernel_size; -inf padding)."""

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(_Pool2d):
    """(N, C, H, W) -> (N, C, OH, OW): the mean of each window, zero padding counted (PyTorch's default)."""

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)
