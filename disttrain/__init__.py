"""disttrain: a distributed deep-learning training system with its own autograd engine.

PyTorch-shaped API: dt.tensor, dt.nn, dt.optim, loss.backward(), opt.step().
"""
import os as _os
import sys as _sys

# NOTE: OpenBLAS's idle worker threads busy-wait 2^28 cycles after every multi-threaded BLAS call, holding the
# cores that disttrain's intra-op threads need for the passes between GEMMs (the cross-entropy, the LSTM's
# batch blocks, the optimizer), so those passes gain nothing from a second thread. 2^16 cycles still covers
# back-to-back GEMMs (benchmarks/RESULTS.md, compiled CPU kernels). OpenBLAS reads the variable once, when
# NumPy loads it, so it is set here, before NumPy's first import, and only if the user has not set it. Once
# the compiled kernels load, OpenBLAS's jobs run on their own team instead (kernels_cpu/team.cpp).
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")
from disttrain.tensor import (Tensor, arange, bool_, cuda_available, float32, float64, from_numpy, full,
                              get_num_threads, get_rng_state, int32, int64, manual_seed, ones, ones_like, rand,
                              randint, randn, set_num_threads, set_rng_state, tensor, uniform, zeros, zeros_like)
from disttrain.autograd import enable_grad, grad, is_grad_enabled, no_grad, set_grad_enabled
from disttrain.autograd.ops import (concat, exp, log, matmul, maximum, minimum, relu, sigmoid, split, stack, tanh,
                                    where)
from disttrain.autograd.ops import clip, sum, mean, max, min, permute, reshape, transpose
from disttrain.autograd.ops import concat as cat
from disttrain import autograd

__version__ = "0.1.0"
from disttrain import nn  # noqa: E402  (sits on tensor and autograd)
from disttrain import optim  # noqa: E402  (sits on tensor and autograd)

# The packages above nn and optim load on first use (dt.train.fit, dt.parallel.DataParallel, ...), so that
# `import disttrain` stays quick and loads neither MPI nor pyzmq.
_LAZY_PACKAGES = ("checkpointing", "data", "models", "train", "parallel", "paramserver")


def __getattr__(name):
    if name in _LAZY_PACKAGES:
        import importlib

        return importlib.import_module(f"disttrain.{name}")
    raise AttributeError(f"module 'disttrain' has no attribute {name!r}")
