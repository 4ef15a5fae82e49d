"""Two ways to run the CUDA kernels, as pytest parameters: "cuda" (on a GPU; marked `gpu`) and
"emulated" (on the CPU through disttrain.kernels_cuda.emulator; runs in CI).

    cp              the array module the kernels run on: CuPy, or NumPy with every kernel emulated
    cuda_kernels    (device, context): run the code inside `with context() as launched:` on `device` to use
                    the CUDA kernels: ("cuda", nothing to do; launched is None), or ("cpu", the CPU
                    backend's kernels swapped for the CUDA wrappers on emulated kernels and its
                    scatter-add for the CUDA backend's; launched: the set of kernel names launched)
"""
import contextlib
import types

import numpy as np
import pytest

import disttrain as dt
from disttrain.kernels_cuda import emulator, loader, wrappers
from disttrain.tensor import backend

NEEDS_GPU = pytest.mark.skipif(not dt.cuda_available(), reason="needs a CUDA GPU")
NEEDS_CXX = pytest.mark.skipif(not emulator.available, reason="the emulator needs a C++ compiler")
RUNS = [pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_GPU]), pytest.param("emulated", marks=NEEDS_CXX)]


def _emulated_kernels(launched):
    """loader.kernels_from the emulator, adding the name of each kernel fetched to `launched`."""
    def kernel(source, name, dtype=None):
        launched.add(name)
        return emulator.kernel(source, name, dtype)

    return loader.kernels_from(kernel)


@pytest.fixture(params=RUNS)
def cp(request):
    if request.param == "cuda":
        import cupy

        yield cupy
        return
    with loader.kernels_from(emulator.kernel):
        yield np


def _cuda_index_add_on_numpy():
    """CudaBackend.index_add itself, over NumPy: the row kernel, or np.add.at where CuPy's scatter_add is."""
    shim = backend.CudaBackend.__new__(backend.CudaBackend)
    shim.xp, shim.kernels, shim._cupyx = np, wrappers, types.SimpleNamespace(scatter_add=np.add.at)
    return shim.index_add


@pytest.fixture(params=RUNS)
def cuda_kernels(request):
    if request.param == "cuda":
        return "cuda", contextlib.nullcontext

    @contextlib.contextmanager
    def emulated():
        launched = set()
        with _emulated_kernels(launched), pytest.MonkeyPatch.context() as patch:
            patch.setattr(backend.CPU, "kernels", wrappers)
            patch.setattr(backend.CPU, "index_add", _cuda_index_add_on_numpy())
            yield launched

    return "cpu", emulated
