"""Keep freed host memory for the next training step: glibc malloc settings for a training process.

A training step allocates and frees the same big arrays every step: ptb_small's (T*B, vocab) logits
and their softmax are 16 MB each, the decoder's and the embedding's weight gradients 8 MB. glibc's
malloc serves such blocks from fresh mmap pages and unmaps them on free (above its mmap threshold,
128 KiB at start, raised on the fly) and gives the top of the heap back to the kernel above its trim
threshold. Each step then faults every 4 KiB page in again, zero-filled by the kernel, thousands of page
faults a ptb_small step (`benchmarks/bench_host_allocator.py`, figures in benchmarks/RESULTS.md).

`retain_freed_memory()` raises the mmap threshold to glibc's maximum (32 MiB) and the trim threshold
to 1 GiB, so freed blocks stay in the heap and the next step reuses them, as PyTorch's CUDA caching
allocator does for device memory (and jemalloc or tcmalloc, preloaded, do for PyTorch on CPUs). The
process keeps its peak heap instead of returning it between steps. It is a process-wide setting, so
Trainer.fit() makes it (the process trains from there on: `disttrain run`, the parameter-server worker,
dt.train.fit), not the library on import, nor a Trainer's construction or train_step; it is skipped
where the user chose a malloc already (MALLOC_*_ / GLIBC_TUNABLES, an LD_PRELOADed allocator) or set
DISTTRAIN_HOST_ALLOCATOR=system, and outside glibc.
"""
import ctypes
import os

__all__ = ["retain_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20                       # glibc's largest allowed (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30
_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def retain_freed_memory(environ=None):
    """Set glibc's malloc to keep freed blocks for reuse. Returns True if set, False where skipped."""
    environ = os.environ if environ is None else environ
    if _user_chose_allocator(environ):
        return False
    libc = _glibc()
    if libc is None:
        return False
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)   # mallopt returns 1 on success, 0 on error
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_set and trim_set)


def _user_chose_allocator(environ):
    if environ.get("DISTTRAIN_HOST_ALLOCATOR", "").strip().lower() == "system":
        return True
    if any(name in environ for name in _USER_MALLOC_ENV) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return True
    preload = environ.get("LD_PRELOAD", "")
    return any(name in preload for name in _PRELOADED_ALLOCATORS)


def _glibc():
    """The running C library if it is glibc (it has gnu_get_libc_version and mallopt), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc
