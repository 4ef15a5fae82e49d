"""LayerNorm: normalisation over the trailing feature axes."""
from disttrain.nn import functional as F
from disttrain.nn import init
from disttrain.nn.module import Module
from disttrain.nn.parameter import Parameter
from disttrain.tensor.creation import zeros


class LayerNorm(Module):
    """(..., *normalized_shape) -> same shape: (x - mean) / sqrt(var + eps) * weight + bias.

    Mean and (biased) variance are taken over the trailing normalized_shape axes.
    weight, bias: normalized_shape, init ones and zeros (absent with elementwise_affine=False).
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, dtype="float32"):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(zeros(shape, dtype=dtype))
            self.bias = Parameter(zeros(shape, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.elementwise_affine:
            init.ones_(self.weight)
            init.zeros_(self.bias)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
