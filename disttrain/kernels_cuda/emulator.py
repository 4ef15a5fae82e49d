"""Run our CUDA kernels on the CPU: the .cu sources compiled as C++ with stand-in CUDA built-ins.

    from disttrain.kernels_cuda import emulator, loader, wrappers
    with loader.kernels_from(emulator.kernel):   # as tests/kernels_cuda's `cp` fixture does
        losses, lse = wrappers.cross_entropy_forward(numpy, logits, target, -100)   # xent.cu ran, on the CPU

A debugging and testing tool, not a device: it checks a kernel's arithmetic, indexing and launch
shape without a GPU, slowly (one CPU thread). `kernel(source, name, dtype)` has loader.kernel's
signature and returns a callable with cupy.RawKernel's call convention, `(grid, block, args,
shared_mem=0)`, taking NumPy arrays where CuPy takes device arrays.

What it checks, beyond running the code:
  - each argument against the kernel's C parameter list, read from the compiled code: an array for a
    pointer (its dtype the pointee's, C-contiguous, since the kernels index flat buffers), a NumPy
    scalar of exactly the C type for a value (CuPy would pass a wider or narrower one as raw bytes);
  - the launch: block and grid within CUDA's limits, dynamic shared memory within 48 KiB;
  - synchronisation the GPU would hang on: a __syncthreads some threads skip, a warp shuffle some
    lanes skip (emulator_runtime.h);
  - memory: each array is copied to end at an inaccessible page (emulator_memory.py), so reading or
    writing past an array's end fails the launch, naming the argument and element.
What it does not model: accesses before an array's start, races between threads (it runs them in
turn), the GPU's own rounding of expf/tanhf and its fused multiply-adds (results differ from the
GPU's in the last bits, as both do from NumPy's).

Each source is compiled once per content into a shared library cached under
$DISTTRAIN_EMULATOR_CACHE (default: a directory in the system's temporary directory).
"""
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from disttrain.kernels_cuda import loader
from disttrain.kernels_cuda.emulator_memory import GuardedArguments

RUNTIME = Path(__file__).resolve().parent / "emulator_runtime.h"
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-Wall", "-Werror", "-Wno-unused-function")
EXTERN_SHARED = "extern __shared__"  # becomes `extern`: the runtime defines the dynamic buffer
# The runtime's type codes and the NumPy dtypes CuPy would pass for them.
TYPE_CODES = {"f": np.dtype(np.float32), "d": np.dtype(np.float64), "q": np.dtype(np.int64),
              "Q": np.dtype(np.uint64), "i": np.dtype(np.int32), "I": np.dtype(np.uint32)}
SYNCHRONISING = ("__syncthreads", "__shfl")  # a source using these needs a fiber per thread
ERROR_BYTES = 512
FAULT = re.compile(r"memory fault at address (0x[0-9a-f]+)")


def compiler():
    """The C++ compiler: $CXX, else g++ or c++ on the PATH; None when there is none."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


available = compiler() is not None


def kernel_names(source):
    """The exported names of `source`.cu: NAME_f32 / NAME_f64 per registered kernel, and the untyped ones."""
    typed = [loader.symbol(source, name, dtype) for name in loader.KERNELS[source] for dtype in loader.SUFFIX]
    return typed + [loader.symbol(source, name) for name in loader.UNTYPED_KERNELS.get(source, ())]


def translation_unit(code, names):
    """The C++ of self-contained CUDA `code`: the runtime, the code, a launcher and signature per kernel."""
    if code.count(EXTERN_SHARED) > 1:
        raise ValueError("the emulator knows one `extern __shared__` buffer (common.cuh's dt_shared_bytes)")
    lines = [f'#include "{RUNTIME}"', code.replace(EXTERN_SHARED, "extern"), ""]
    for name in names:
        lines.append(f'extern "C" int dt_emu_launch_{name}(const unsigned* g, const unsigned* b, '
                     f'unsigned long long s, int f, void** a, char* e, int n) '
                     f'{{ return dt_emu::launch({name}, g, b, s, f, a, e, n); }}')
        lines.append(f'extern "C" const char* dt_emu_signature_{name}() {{ return dt_emu::signature({name}); }}')
    return "\n".join(lines) + "\n"


def _cache_dir():
    root = os.environ.get("DISTTRAIN_EMULATOR_CACHE") or Path(tempfile.gettempdir()) / "disttrain-emulator"
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root)


class Library:
    """Kernels compiled for the CPU from self-contained CUDA code (its #includes already pasted in)."""

    def __init__(self, code, names, label="kernels"):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("the kernel emulator needs a C++ compiler (g++): set $CXX or install one")
        text = translation_unit(code, names)
        key = hashlib.sha256("\0".join([cxx, *FLAGS, RUNTIME.read_text(), text]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"{label}-{key}.so"
        if not path.exists():
            _build(cxx, label, text, path)
        self._lib = ctypes.CDLL(str(path))
        self.names = tuple(names)
        self.with_fibers = any(word in code for word in SYNCHRONISING)

    def kernel(self, name):
        if name not in self.names:
            raise KeyError(f"no kernel {name!r} here; compiled: {', '.join(self.names)}")
        return EmulatedKernel(self._lib, name, self.with_fibers)


def _build(cxx, label, text, path):
    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / f"{label}.cpp"
        unit.write_text(text)
        partial = Path(tmp) / path.name
        done = subprocess.run([cxx, *FLAGS, str(unit), "-o", str(partial)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"compiling {label} for the emulator failed:\n{done.stderr}")
        os.replace(partial, path)  # atomic: a concurrent build of the same key writes the same bytes


@functools.lru_cache(maxsize=None)
def library(source):
    """The Library of `source`.cu (built on first use, cached on disk by content)."""
    if source not in loader.KERNELS:
        raise KeyError(f"unknown kernel source {source!r}; known: {', '.join(sorted(loader.KERNELS))}")
    return Library(loader.source_text(source), kernel_names(source), label=source)


class EmulatedKernel:
    """One kernel of a compiled source, called like cupy.RawKernel with NumPy arrays."""

    def __init__(self, lib, name, with_fibers):
        self.name = name
        self._launch = getattr(lib, f"dt_emu_launch_{name}")
        self._launch.restype = ctypes.c_int
        signature = getattr(lib, f"dt_emu_signature_{name}")
        signature.restype = ctypes.c_char_p
        codes = signature().decode()
        self.parameters = codes.split(",") if codes else []
        self.with_fibers = with_fibers

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if len(args) != len(self.parameters):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.parameters)} parameters "
                            f"({', '.join(self.parameters)})")
        for k, (code, arg) in enumerate(zip(self.parameters, args)):
            self._check(k, code, arg)
        arrays = {k: a for k, a in enumerate(args) if isinstance(a, np.ndarray)}
        writes = [k for k in arrays if not self.parameters[k].startswith("*c")]
        with GuardedArguments(arrays, writes) as memory:
            values = [ctypes.c_void_p(memory.address(k)) if k in arrays
                      else np.ctypeslib.as_ctypes(np.asarray(a).reshape(1)) for k, a in enumerate(args)]
            pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
            error = ctypes.create_string_buffer(ERROR_BYTES)
            failed = self._launch(_dim3(grid, "grid"), _dim3(block, "block"), ctypes.c_ulonglong(int(shared_mem)),
                                  ctypes.c_int(self.with_fibers), pointers, error, ctypes.c_int(ERROR_BYTES))
            if failed:
                message = error.value.decode()
                fault = FAULT.search(message)
                detail = fault and memory.describe_fault(int(fault.group(1), 16))
                raise RuntimeError(f"{self.name} (grid {tuple(grid)}, block {tuple(block)}): {message}"
                                   + (f": {detail}" if detail else ""))
            memory.succeeded = True

    def _check(self, k, code, arg):
        """Argument k against the kernel's parameter `code` (emulator_runtime.h's type codes)."""
        where = f"{self.name} argument {k} ({code})"
        if code.startswith("*"):
            pointee = TYPE_CODES[code[-1]]
            if not isinstance(arg, np.ndarray):
                raise TypeError(f"{where}: expected an array for a pointer, got {type(arg).__name__}")
            if arg.dtype != pointee:
                raise TypeError(f"{where}: array of {arg.dtype}, the kernel reads {pointee}")
            if not arg.flags.c_contiguous:
                raise ValueError(f"{where}: array is not C-contiguous; the kernel indexes a flat buffer")
            return
        expected = TYPE_CODES[code]
        if not isinstance(arg, np.generic) or arg.dtype != expected:
            raise TypeError(f"{where}: expected a NumPy {expected} scalar, got {type(arg).__name__} {arg!r}")


def _dim3(dims, what):
    dims = tuple(int(d) for d in dims)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} must have 1 to 3 dimensions, got {dims}")
    return (ctypes.c_uint * 3)(*(dims + (1,) * (3 - len(dims))))


@functools.lru_cache(maxsize=None)
def kernel(source, name, dtype=None):
    """loader.kernel's counterpart: the emulated kernel `name` of `source` for `dtype` (None: untyped)."""
    return library(source).kernel(loader.symbol(source, name, dtype))
