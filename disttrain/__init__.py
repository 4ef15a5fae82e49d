"""disttrain: a distributed deep-learning training system with its own autograd engine.

PyTorch-shaped API: dt.tensor, dt.nn, dt.optim, loss.backward(), opt.step().
"""
from disttrain.tensor import (Tensor, arange, bool_, cuda_available, float32, float64, from_numpy, full,
                              get_num_threads, get_rng_state, int32, int64, manual_seed, ones, ones_like, rand,
                              randint, randn, set_num_threads, set_rng_state, tensor, uniform, zeros, zeros_like)
from disttrain.autograd import enable_grad, grad, is_grad_enabled, no_grad, set_grad_enabled
from disttrain.autograd.ops import (concat, exp, log, matmul, maximum, relu, sigmoid, split, stack, tanh,
                                    where)
from disttrain.autograd.ops import clip, sum, mean, max, min, reshape, transpose
from disttrain import autograd

__version__ = "0.1.0"
from disttrain import nn  # noqa: E402  (sits on tensor and autograd)
from disttrain import optim  # noqa: E402  (sits on tensor and autograd)
