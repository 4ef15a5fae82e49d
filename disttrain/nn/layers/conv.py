"""Conv2d: 2-D convolution (cross-correlation, as PyTorch) through im2col."""
import math

from disttrain.nn import functional as F
from disttrain.nn import init
from disttrain.nn.module import Module
from disttrain.nn.parameter import Parameter
from disttrain.tensor.creation import zeros


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class Conv2d(Module):
    """(N, in_channels, H, W) -> (N, out_channels, OH, OW), OH = (H + 2*padding - kh) // stride + 1.

    weight: (out_channels, in_channels, kh, kw), bias: (out_channels,) (PyTorch's layout).
    Init as PyTorch: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_channels*kh*kw.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, dtype="float32"):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.weight = Parameter(zeros(out_channels, in_channels, *self.kernel_size, dtype=dtype))
        self.register_parameter("bias", Parameter(zeros(out_channels, dtype=dtype)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        if self.bias is not None:
            fan_in, _ = init.calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self):
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        return text + ("" if self.bias is not None else ", bias=False")
