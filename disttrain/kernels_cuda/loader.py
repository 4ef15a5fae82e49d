"""Compile the .cu sources once per process with cupy.RawModule and hand out cached, named kernels.

    kernel("lstm", "lstm_cell_forward", numpy.float32)   # -> cupy.RawKernel lstm_cell_forward_f32
    with kernels_from(emulator.kernel): ...                # the kernels from elsewhere (the CPU emulator)

Each source is compiled on first use (NVRTC by default, or nvcc with DISTTRAIN_CUDA_COMPILER=nvcc),
then CuPy keeps the binary in memory and in its on-disk kernel cache. The shared preamble common.cuh
is pasted in place of the `#include "common.cuh"` line, so the code NVRTC sees is one self-contained
string (and CuPy's cache key covers the preamble too).
"""
import contextlib
import functools
import os
from pathlib import Path

import numpy as np

try:  # Chainer's guard: this module imports without CuPy; `available` says whether kernels can be built
    import cupy
    available = True
except ImportError:  # pragma: no cover - CuPy is the `cuda` extra
    cupy = None
    available = False

SOURCE_DIR = Path(__file__).resolve().parent
PREAMBLE = "common.cuh"
INCLUDE_LINE = f'#include "{PREAMBLE}"'
OPTIONS = ("--std=c++17",)

# Every kernel the wrappers may ask for, by source; the float kernels exist as NAME_f32 and NAME_f64.
KERNELS = {
    "lstm": ("lstm_cell_forward", "lstm_cell_backward"),
    "xent": ("xent_forward_warp", "xent_forward_block", "xent_backward"),
    "embedding": ("index_add_rows",),
    "elementwise": ("bias_act_forward", "bias_act_backward"),
    "optim": ("sgd_step", "adam_step"),
    "norms": ("norm_accumulate", "scale", "clip_scale"),
    "bucket": ("copy_scaled",),
    "random": ("counter_uniform",),
    "gelu": ("gelu_forward", "gelu_backward", "gelu_erf_forward", "gelu_erf_backward"),
    "softmax": ("softmax_forward_warp", "softmax_forward_block", "softmax_backward_warp", "softmax_backward_block"),
    "layer_norm": ("layer_norm_forward", "layer_norm_backward", "layer_norm_param_grads"),
}
UNTYPED_KERNELS = {"norms": ("norm_finalize",)}  # kernels without a dtype suffix
SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def sources():
    """Names of the .cu files in this package (without the extension)."""
    return sorted(p.stem for p in SOURCE_DIR.glob("*.cu"))


def source_text(name):
    """The self-contained code of `name`.cu: the preamble pasted over its include line."""
    code = (SOURCE_DIR / f"{name}.cu").read_text()
    if code.count(INCLUDE_LINE) != 1:
        raise RuntimeError(f"{name}.cu must contain the line {INCLUDE_LINE!r} exactly once")
    return code.replace(INCLUDE_LINE, (SOURCE_DIR / PREAMBLE).read_text())


def compiler():
    """'nvrtc' (default) or 'nvcc', from $DISTTRAIN_CUDA_COMPILER."""
    choice = os.environ.get("DISTTRAIN_CUDA_COMPILER", "nvrtc")
    if choice not in ("nvrtc", "nvcc"):
        raise ValueError(f"DISTTRAIN_CUDA_COMPILER must be 'nvrtc' or 'nvcc', got {choice!r}")
    return choice


@functools.lru_cache(maxsize=None)
def module(name):
    """The cupy.RawModule of `name`.cu, created once (compiled when a kernel is first fetched)."""
    if not available:
        raise RuntimeError("disttrain.kernels_cuda needs CuPy: install disttrain[cuda]")
    if name not in KERNELS:
        raise KeyError(f"unknown kernel source {name!r}; known: {', '.join(sorted(KERNELS))}")
    return cupy.RawModule(code=source_text(name), options=OPTIONS, backend=compiler())


def symbol(source, name, dtype=None):
    """The exported name of kernel `name` of `source`.cu for float dtype `dtype` (None: untyped)."""
    if dtype is None:
        if name not in UNTYPED_KERNELS.get(source, ()):
            raise KeyError(f"{source}.cu has no untyped kernel {name!r}")
        return name
    if name not in KERNELS.get(source, ()):
        raise KeyError(f"{source}.cu has no kernel {name!r}; known: {KERNELS.get(source)}")
    try:
        suffix = SUFFIX[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"kernel {name}: no CUDA kernel for dtype {np.dtype(dtype)}") from None
    return f"{name}_{suffix}"


def kernel(source, name, dtype=None):
    """The cached RawKernel `name` of `source` for float dtype `dtype` (None for untyped kernels), or what the
    factory of an enclosing kernels_from() gives for it."""
    if _factories:
        return _factories[-1](source, name, dtype)
    return _device_kernel(source, name, dtype)


@functools.lru_cache(maxsize=None)
def _device_kernel(source, name, dtype):
    return module(source).get_function(symbol(source, name, dtype))


_factories = []   # the factories of the kernels_from() blocks open now, innermost last


@contextlib.contextmanager
def kernels_from(factory):
    """Within the block, kernel() returns factory(source, name, dtype): a callable with cupy.RawKernel's call
    convention, e.g. emulator.kernel, which runs the same .cu sources on the CPU. Blocks nest."""
    _factories.append(factory)
    try:
        yield
    finally:
        _factories.remove(factory)


def compile_all():
    """Compile every source now (e.g. before capturing a CUDA graph, or to time compilation)."""
    for source, names in KERNELS.items():
        for name in names:
            for dtype in SUFFIX:
                kernel(source, name, dtype)
        for name in UNTYPED_KERNELS.get(source, ()):
            kernel(source, name)
