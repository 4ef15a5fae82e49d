"""Linear: an affine map of the last axis."""
import math

from disttrain.nn import functional as F
from disttrain.nn import init
from disttrain.nn.module import Module
from disttrain.nn.parameter import Parameter
from disttrain.tensor.creation import zeros


class Linear(Module):
    """y = x @ weight.T + bias for x of shape (..., in_features) -> (..., out_features).

    weight: (out_features, in_features), bias: (out_features,) (PyTorch's layout).
    Init as PyTorch: weight and bias ~ U(-1/sqrt(in_features), 1/sqrt(in_features)).
    """

    def __init__(self, in_features, out_features, bias=True, dtype="float32"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = Parameter(zeros(out_features, in_features, dtype=dtype))
        self.register_parameter("bias", Parameter(zeros(out_features, dtype=dtype)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
