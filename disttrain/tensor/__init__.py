"""Tensor, dtypes, devices/backends, random generators, intra-op threads and creation functions."""
from disttrain.tensor.tensor import Tensor
from disttrain.tensor.dtypes import bool_, float32, float64, int32, int64
from disttrain.tensor.backend import cuda_available, get_backend
from disttrain.tensor.random import get_rng_state, manual_seed, set_rng_state
from disttrain.tensor.threads import get_num_threads, set_num_threads
from disttrain.tensor.creation import (arange, from_numpy, full, ones, ones_like, rand, randint, randn, tensor,
                                       uniform, zeros, zeros_like)
