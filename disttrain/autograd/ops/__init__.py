"""Differentiable ops. Each Function subclass keeps forward and backward side by side;
the lowercase functions here are the public entry points (Tensor methods call them)."""
from disttrain.autograd.ops.attention import (MaskedSoftmax, ScaledDotProductAttention, masked_softmax,
                                             scaled_dot_product_attention)
from disttrain.autograd.ops.conv import Fold, Unfold, avg_pool2d, conv2d, max_pool2d, unfold
from disttrain.autograd.ops.elementwise import (Abs, Add, Clip, Div, Exp, Gelu, Log, Maximum, Mul, Neg, NormalCdf,
                                                Pow, Relu, Sigmoid, Sub, Tanh, Where, maximum, minimum, sum_to, where)
from disttrain.autograd.ops.linalg import Linear, MatMul, linear, matmul
from disttrain.autograd.ops.lstm import (LSTMCell, LSTMLayer, lstm_cell, lstm_cell_reference, lstm_layer,
                                         lstm_layer_reference)
from disttrain.autograd.ops.nn import (CrossEntropy, LogSoftmax, Softmax, cross_entropy, dropout, embedding,
                                       layer_norm, log_softmax, mse_loss, softmax)
from disttrain.autograd.ops.reduce import (Max, MaxResult, MinResult, Sum, amax, amin, max, mean, min, std, sum,
                                          torch_names, var)
from disttrain.autograd.ops.shape import (BroadcastTo, Cast, Concat, GetItem, IndexAdd, Permute, Reshape,
                                          ToDevice, broadcast_to, cast, concat, getitem, permute, reshape, split,
                                          stack, to_device, transpose, unbind, Unbind)
from disttrain.tensor.kernels_numpy import check_gelu_approximate
from disttrain.tensor.tensor import Tensor


def add(a, b):
    return Add.apply(a, b)


def sub(a, b):
    return Sub.apply(a, b)


def mul(a, b):
    return Mul.apply(a, b)


def div(a, b):
    return Div.apply(a, b)


def neg(a):
    return Neg.apply(a)


def pow(a, b):
    return Pow.apply(a, b)


def exp(a):
    return Exp.apply(a)


def log(a):
    return Log.apply(a)


def tanh(a):
    return Tanh.apply(a)


def sigmoid(a):
    return Sigmoid.apply(a)


def relu(a):
    return Relu.apply(a)


def gelu(a, approximate="none"):
    """GELU as torch's: approximate="none" (the default) the exact x Phi(x), "tanh" the tanh form."""
    return Gelu.apply(a, approximate=check_gelu_approximate(approximate, "gelu"))


def abs(a):
    return Abs.apply(a)


def clip(a, min=None, max=None):
    return Clip.apply(a, min, max)
