"""Backends: one object per device kind, holding the array module and the device-specific kernels.

Ops never import numpy or cupy directly; they ask the tensor's backend (`node.xp`,
`node.backend.index_add(...)`), so the CUDA backend plugs in without touching op code.

`backend.kernels` is a module of fused kernels with one set of names and signatures, called as
`backend.kernels.f(backend.xp, ...)`: on the CPU disttrain.kernels_cpu.wrappers (the LSTM layer, the
cross-entropy, Linear's forward, the row scatter-add, the Transformer's GELU, softmax and LayerNorm and
the multi-tensor norms, scale_, SGD and Adam updates compiled, the rest disttrain.tensor.kernels_numpy, the
reference), or kernels_numpy itself when $DISTTRAIN_CPU_KERNELS=numpy; disttrain.kernels_cuda.wrappers (our
CUDA C kernels) on the GPU.

`backend.sync_checks`: ops may read device values on the host to validate indices (class targets,
embedding ids). True except while a CUDA graph is being captured (disttrain.train.cuda_graph),
when a host read is not allowed and the capturing code validates its inputs itself.
"""
import numpy as np

from disttrain.tensor import kernels_numpy


def cpu_kernels():
    """The CPU kernel table that $DISTTRAIN_CPU_KERNELS asks for: the compiled one by default, "numpy" for
    the NumPy reference (the compiled table itself falls back to it where its library is missing)."""
    from disttrain.kernels_cpu import native, wrappers  # kernels_cpu builds on this package's modules

    return kernels_numpy if native.requested() == "numpy" else wrappers


def is_row_scatter(xp, target, index, values):
    """Whether target[index] += values adds whole rows of a 2-D target picked by one integer array of xp
    (the embedding backward), the case the kernel tables' index_add_rows serves."""
    return (type(index) is xp.ndarray and index.dtype.kind in "iu" and target.ndim == 2
            and type(values) is xp.ndarray and values.shape == index.shape + target.shape[1:])


class CpuBackend:
    """NumPy arrays in host memory."""

    name = "cpu"
    xp = np
    array_type = np.ndarray
    kernels = cpu_kernels()  # fused ops, called as backend.kernels.f(backend.xp, ...)
    sync_checks = True

    def asarray(self, data, dtype=None):
        return np.asarray(data, dtype=dtype)

    def to_numpy(self, array):
        return array

    def index_add(self, target, index, values):
        """target[index] += values, with repeated indices accumulating (scatter-add): rows of a 2-D target
        picked by one integer array (the embedding backward) go to the kernel table's index_add_rows."""
        if is_row_scatter(np, target, index, values):
            self.kernels.index_add_rows(np, target, index, values)
        else:
            np.add.at(target, index, values)

    def as_strided(self, array, shape, strides):
        return np.lib.stride_tricks.as_strided(array, shape=shape, strides=strides, writeable=False)


class CudaBackend:
    """CuPy arrays on the current GPU. Created only when CuPy imports and a GPU is present."""

    name = "cuda"

    def __init__(self, cupy):
        import cupyx

        from disttrain.kernels_cuda import wrappers

        self.xp = cupy
        self.array_type = cupy.ndarray
        self.kernels = wrappers  # our CUDA kernels, same names and signatures as kernels_numpy
        self.sync_checks = True
        self._cupyx = cupyx

    def asarray(self, data, dtype=None):
        return self.xp.asarray(data, dtype=dtype)

    def to_numpy(self, array):
        return self.xp.asnumpy(array)

    def index_add(self, target, index, values):
        """target[index] += values (scatter-add): rows of a 2-D target picked by one integer array (the
        embedding backward) go to the atomic row kernel, any other indexing to cupyx.scatter_add."""
        xp = self.xp
        if is_row_scatter(xp, target, index, values):
            self.kernels.index_add_rows(xp, target, index, values)
        else:
            self._cupyx.scatter_add(target, index, values)

    def as_strided(self, array, shape, strides):
        return self.xp.lib.stride_tricks.as_strided(array, shape=shape, strides=strides)

    def synchronize(self):
        """Wait for all work queued on the current GPU (timing, benchmarks)."""
        self.xp.cuda.Device().synchronize()

    def memory_stats(self):
        """CuPy memory-pool figures in bytes: used by live arrays, held by the pool (used or cached),
        and pinned host memory held for transfers."""
        pool = self.xp.get_default_memory_pool()
        pinned = self.xp.get_default_pinned_memory_pool()
        return {"used_bytes": pool.used_bytes(), "pool_bytes": pool.total_bytes(),
                "free_bytes": pool.free_bytes(), "pinned_free_blocks": pinned.n_free_blocks()}


CPU = CpuBackend()
_cuda = None
_cuda_error = None
BACKEND_OF_ARRAY_TYPE = {np.ndarray: CPU}     # array type -> its backend (read it; cuda_backend() adds CuPy's)


def cuda_backend():
    """The CUDA backend, or a RuntimeError that says why it is unavailable."""
    global _cuda, _cuda_error
    if _cuda is None and _cuda_error is None:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("no CUDA device found")
            _cuda = CudaBackend(cupy)
            BACKEND_OF_ARRAY_TYPE[cupy.ndarray] = _cuda
        except Exception as exc:  # ImportError, CUDARuntimeError, ...
            _cuda_error = f"{type(exc).__name__}: {exc}"
    if _cuda is None:
        raise RuntimeError(f"device 'cuda' is not available ({_cuda_error}); install disttrain[cuda] on a machine with a GPU")
    return _cuda


def cuda_available():
    try:
        cuda_backend()
        return True
    except RuntimeError:
        return False


def get_backend(device):
    """Backend for a device name: "cpu", "cuda" (or "cuda:0", the one GPU a worker uses)."""
    if device is None or device == "cpu":
        return CPU
    if isinstance(device, str) and device.split(":")[0] == "cuda":
        return cuda_backend()
    raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")


def backend_of_array(array):
    try:
        return BACKEND_OF_ARRAY_TYPE[type(array)]
    except KeyError:
        raise TypeError(f"expected a NumPy or CuPy array, got {type(array).__name__}") from None


def by_backend(tensors):
    """[(backend, positions of its tensors in `tensors`)], in order of first appearance: for the multi-tensor
    kernels, which take one backend's arrays in one call."""
    groups = {}
    for k, t in enumerate(tensors):
        groups.setdefault(t.backend.name, (t.backend, []))[1].append(k)
    return list(groups.values())
