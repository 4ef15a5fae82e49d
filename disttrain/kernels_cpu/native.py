"""Loading the compiled kernels (native.cpp, built into `_native` when disttrain is installed) and handing
them the GEMM of the BLAS that NumPy loaded.

`library()` returns the ctypes library, or None when it cannot be used; `unavailable_reason()` then says
why in one line. Nothing is loaded at import: the first kernel call loads it.

The BLAS: NumPy wheels ship OpenBLAS with renamed symbols (`scipy_sgemm_64_`: prefix `scipy_`, suffix
`64_`, 64-bit integers) and export no C interface meant for other extensions. threadpoolctl, which
already finds that library to set its thread count, gives its file; its `openblas_get_config` and
Fortran `?gemm_` are looked up there under the known renamings, and the integer width is read from the
configuration string (USE64BITINT). Calling that same library keeps one BLAS thread pool in the process,
the one `dt.set_num_threads` and threads.one_blas_thread set. Another BLAS (MKL, Accelerate, a BLAS
threadpoolctl cannot name) means the NumPy kernels.
"""
import ctypes
import importlib.util
import os

import numpy as np
import threadpoolctl

ENV_VAR = "DISTTRAIN_CPU_KERNELS"          # "numpy" forces the NumPy kernels; unset or "compiled": these
CHOICES = ("compiled", "numpy")
# Whose threads run the BLAS's parallel jobs once the kernels are loaded: ours (team.cpp, whose idle
# threads sleep after microseconds) or, with "openblas", OpenBLAS's own (idle ones poll for ~0.1 s)
BLAS_THREADS_ENV_VAR = "DISTTRAIN_BLAS_THREADS"
BLAS_THREADS_CHOICES = ("disttrain", "openblas")

# OpenBLAS's cores with small-matrix GEMM kernels (no packing) for GEMMs of at most SMALL_GEMM_MACS
# multiply-adds: its kernel/x86_64/KERNEL.SKYLAKEX permit, which Cooperlake and SapphireRapids include;
# elsewhere (Haswell, Zen, ...) every GEMM packs its operands
SMALL_GEMM_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")
SMALL_GEMM_MACS = 1_000_000

_library = None
_reason = None
_loaded = False
_small_gemm_macs = 0
_packed_gemm = False
_blas_jobs_on_our_threads = False

_I64 = ctypes.c_int64
_P = ctypes.c_void_p
_BLOCKS = [_P, _I64]  # every kernel's last-but-chunk arguments: its row blocks' bounds and their count (team.h)
_SIGNATURES = {
    "dt_lstm_forward_{s}": [_P] * 8 + [_I64] * 3 + _BLOCKS + [_I64],
    "dt_lstm_backward_{s}": [_P] * 13 + [_I64] * 3 + _BLOCKS + [_I64],
    "dt_cross_entropy_forward_{s}": [_P, _P, _I64, _P, _P, _P, _I64] + _BLOCKS,
    "dt_cross_entropy_backward_{s}": [_P] * 4 + [_I64] + _BLOCKS,
    "dt_gelu_forward_{s}": [_P, _P] + _BLOCKS,
    "dt_gelu_backward_{s}": [_P, _P, _P] + _BLOCKS,
    "dt_gelu_erf_forward_{s}": [_P, _P] + _BLOCKS,
    "dt_gelu_erf_backward_{s}": [_P, _P, _P] + _BLOCKS,
    "dt_softmax_forward_{s}": [_P, _P, _I64, _I64, ctypes.c_int] + _BLOCKS,
    "dt_softmax_backward_{s}": [_P, _P, _P, _I64] + _BLOCKS,
    "dt_layer_norm_forward_{s}": [_P, _P, _P, ctypes.c_double, _P, _P, _P, _I64] + _BLOCKS,
    "dt_layer_norm_backward_{s}": [_P] * 8 + [_I64] * 3 + _BLOCKS,
    "dt_linear_bias_gemm_{s}": [_P] * 4 + [_I64] * 3 + _BLOCKS,
    "dt_index_add_rows_{s}": [_P] * 3 + [_I64] * 3 + _BLOCKS,
    "dt_foreach_sum_squares_{s}": [_P] * 3 + [_I64] * 2 + [_P] + _BLOCKS,
    "dt_foreach_scale_{s}": [_P, _P, _I64, ctypes.c_double] + _BLOCKS,
    "dt_foreach_sgd_{s}": [_P] * 5 + [_I64] + [ctypes.c_double] * 4 + [ctypes.c_int] * 2 + _BLOCKS,
    "dt_foreach_adam_{s}": [_P] * 8 + [_I64] + [ctypes.c_double] * 5 + [ctypes.c_int] * 2 + _BLOCKS,
    "dt_attention_forward_{s}": [_P] * 7 + [_I64, _P, ctypes.c_double, ctypes.c_int] + _BLOCKS,
    "dt_attention_backward_{s}": [_P] * 11 + [_I64, _P, ctypes.c_double, ctypes.c_int] + _BLOCKS,
}
# built for float32 only: float64 (the gradient checks' dtype) keeps the reference's arithmetic, see wrappers.py
FLOAT32_ONLY = ("dt_gelu_forward_{s}", "dt_gelu_backward_{s}")
# (symbol prefix, suffix) of OpenBLAS builds: plain, 64-bit-integer (Debian's libopenblas64), NumPy/SciPy wheels
_OPENBLAS_RENAMINGS = (("", ""), ("", "64_"), ("scipy_", "64_"), ("scipy_", ""))
SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def requested():
    """What $DISTTRAIN_CPU_KERNELS asks for: "compiled" (the default) or "numpy"."""
    return _env_choice(ENV_VAR, CHOICES)


def _env_choice(var, choices):
    """$var, one of `choices` (unset or empty: the first), else ValueError naming the variable and the choices."""
    value = os.environ.get(var, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"${var} must be one of {', '.join(choices)}, got {value!r}")
    return value


def library():
    """The loaded kernels (a ctypes.CDLL with the BLAS set), or None (see unavailable_reason)."""
    global _library, _reason, _loaded
    if not _loaded:
        _loaded = True
        try:
            _library = _load()
        except (OSError, RuntimeError, AttributeError) as exc:
            _reason = str(exc)
    return _library


def small_gemm_macs():
    """The largest float32 GEMM (in multiply-adds) that NumPy's OpenBLAS runs without packing its operands,
    0 where it packs every GEMM (known once library() has loaded)."""
    return _small_gemm_macs


def packed_gemm_available():
    """Whether the compiled LSTM can run its float32 recurrent GEMMs on a packed W_hh (native.cpp, an
    AVX-512 CPU) instead of the BLAS (known once library() has loaded)."""
    return _packed_gemm


def blas_jobs_on_our_threads():
    """Whether OpenBLAS hands its parallel jobs to team.cpp's threads (known once library() has
    loaded; False with $DISTTRAIN_BLAS_THREADS=openblas or an OpenBLAS older than 0.3.27)."""
    return _blas_jobs_on_our_threads


def blas_threads_requested():
    """What $DISTTRAIN_BLAS_THREADS asks for: "disttrain" (the default) or "openblas"."""
    return _env_choice(BLAS_THREADS_ENV_VAR, BLAS_THREADS_CHOICES)


def unavailable_reason():
    """Why library() is None, in one line; None when it is available (or not tried yet)."""
    return _reason


def _load():
    spec = importlib.util.find_spec("disttrain.kernels_cpu._native")
    if spec is None or not spec.origin:
        raise RuntimeError("disttrain.kernels_cpu._native was not built (no C++ compiler at install?)")
    lib = ctypes.CDLL(spec.origin)
    for name, argtypes in _SIGNATURES.items():
        for dtype, suffix in SUFFIX.items():
            if name in FLOAT32_ONLY and dtype != np.float32:
                continue
            fn = getattr(lib, name.format(s=suffix))
            fn.argtypes, fn.restype = argtypes, None
    sgemm, dgemm, int64, core, set_threads_callback = _numpy_blas_gemm()
    lib.dt_set_blas.argtypes, lib.dt_set_blas.restype = [_P, _P, ctypes.c_int], None
    lib.dt_set_blas(sgemm, dgemm, int64)
    global _small_gemm_macs, _packed_gemm, _blas_jobs_on_our_threads
    if set_threads_callback is not None and blas_threads_requested() == "disttrain":
        set_threads_callback.argtypes, set_threads_callback.restype = [_P], None
        set_threads_callback(ctypes.cast(lib.dt_blas_run_jobs, _P).value)
        _blas_jobs_on_our_threads = True
    lib.dt_blas_team_calls.argtypes, lib.dt_blas_team_calls.restype = [], ctypes.c_uint64
    lib.dt_block_team_calls.argtypes, lib.dt_block_team_calls.restype = [], ctypes.c_uint64
    _small_gemm_macs = SMALL_GEMM_MACS if core in SMALL_GEMM_CORES else 0
    lib.dt_packed_gemm_available.argtypes, lib.dt_packed_gemm_available.restype = [], ctypes.c_int
    lib.dt_packed_size.argtypes, lib.dt_packed_size.restype = [_I64, _I64], _I64
    lib.dt_pack_panels.argtypes, lib.dt_pack_panels.restype = [_P] + [_I64] * 4 + [_P], None
    _packed_gemm = bool(lib.dt_packed_gemm_available())
    return lib


def _numpy_blas_gemm():
    """(sgemm_ address, dgemm_ address, 64-bit integers?, core name, its openblas_set_threads_callback_function
    or None where it has none) of the OpenBLAS NumPy loaded."""
    np.dot(np.ones((2, 2)), np.ones((2, 2)))  # make sure NumPy's BLAS is loaded
    blas = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    openblas = [lib for lib in blas if lib["internal_api"] == "openblas"]
    if not openblas:
        names = ", ".join(lib["internal_api"] for lib in blas) or "none found"
        raise RuntimeError(f"NumPy's BLAS is not OpenBLAS ({names})")
    path = openblas[0]["filepath"]
    dynlib = ctypes.CDLL(path)  # already loaded: this only opens a handle to it
    for prefix, suffix in _OPENBLAS_RENAMINGS:
        get_config = getattr(dynlib, f"{prefix}openblas_get_config{suffix}", None)
        if get_config is not None:
            break
    else:
        raise RuntimeError(f"{path} has no openblas_get_config under any known symbol naming")
    get_config.restype = ctypes.c_char_p
    addresses = []
    for routine in ("sgemm_", "dgemm_"):
        symbol = f"{prefix}{routine}{suffix}"
        try:
            addresses.append(ctypes.cast(getattr(dynlib, symbol), _P).value)
        except AttributeError:
            raise RuntimeError(f"{path} has no {symbol}") from None
    set_threads_callback = getattr(dynlib, f"{prefix}openblas_set_threads_callback_function{suffix}", None)
    return (addresses[0], addresses[1], b"USE64BITINT" in get_config(), openblas[0].get("architecture"),
            set_threads_callback)
