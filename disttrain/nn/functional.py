"""Stateless layer functions with torch.nn.functional's names and argument names.

Thin wrappers over disttrain.autograd.ops, where forward and backward live; `dim` is
PyTorch's name for an axis and `axis` is accepted as well.
"""
from disttrain.autograd import ops
from disttrain.autograd.function import OpError
from disttrain.autograd.ops import avg_pool2d, conv2d, max_pool2d, mse_loss

__all__ = ["relu", "sigmoid", "tanh", "gelu", "softmax", "log_softmax", "cross_entropy", "mse_loss", "dropout",
           "embedding", "layer_norm", "conv2d", "max_pool2d", "avg_pool2d", "linear", "scaled_dot_product_attention"]


def relu(input):
    return ops.relu(input)


def sigmoid(input):
    return ops.sigmoid(input)


def tanh(input):
    return ops.tanh(input)


def gelu(input, approximate="none"):
    """torch's gelu: x Phi(x) (Phi the standard normal CDF) by default; approximate="tanh" for
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return ops.gelu(input, approximate)


def _axis(dim, axis, name):
    if axis is not None and dim is not None and axis != dim:
        raise ValueError(f"{name}: got dim={dim} and axis={axis}; pass one of them")
    if axis is not None:
        return axis
    return -1 if dim is None else dim


def softmax(input, dim=None, axis=None):
    """exp(x) / sum(exp(x)) along `dim` (default: the last axis)."""
    return ops.softmax(input, axis=_axis(dim, axis, "softmax"))


def log_softmax(input, dim=None, axis=None):
    """log(softmax(x)) along `dim` (default: the last axis), computed stably."""
    return ops.log_softmax(input, axis=_axis(dim, axis, "log_softmax"))


def cross_entropy(input, target, ignore_index=-100, reduction="mean"):
    """Logits (N, C) or (N, C, d1, ...) against int64 class indices (N,) or (N, d1, ...)."""
    return ops.cross_entropy(input, target, ignore_index=ignore_index, reduction=reduction)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """softmax(query key^T scale + mask) value over the last two axes, with torch's arguments (see
    disttrain.autograd.ops.scaled_dot_product_attention)."""
    return ops.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale)


def dropout(input, p=0.5, training=True):
    """Inverted dropout: zero with probability p and scale survivors by 1/(1-p); identity when not training."""
    return ops.dropout(input, p=p, training=training)


def embedding(input, weight):
    """Rows of weight (num_embeddings, embedding_dim) at int indices `input` -> input.shape + (embedding_dim,)."""
    return ops.embedding(input, weight)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalise over the trailing `normalized_shape` axes, then scale by weight and shift by bias."""
    return ops.layer_norm(input, normalized_shape, weight, bias, eps)


def linear(input, weight, bias=None):
    """input (..., in_features) @ weight.T + bias, weight (out_features, in_features), bias (out_features,).

    One fused node (ops.linalg.Linear); leading dimensions fold into one GEMM.
    """
    out_features, in_features = weight.shape
    if input.shape[-1:] != (in_features,):
        raise OpError(f"linear: input shape {input.shape} does not end with in_features={in_features} "
                      f"(weight shape {weight.shape})")
    return ops.linear(input, weight, bias)
