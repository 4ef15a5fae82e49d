"""Intra-op threads for the CPU backend's big elementwise passes (torch.set_num_threads' counterpart).

NumPy's BLAS already runs GEMMs on every core, but its ufuncs run on one thread: on the language
model's (T*B, vocab) logits the bias add and the cross-entropy's passes (max, shift, exp, row sums,
the gradient's scaling) each read and write 16 MB on a single core while the others idle. PyTorch
splits such loops over its intra-op pool. `parallel_rows` does the same for NumPy: it cuts the rows
into one contiguous block per thread and runs the pass on each; ufuncs release the GIL on arrays this
big, so the blocks run side by side. Results are bit for bit those of one thread, since every row is
computed by the same code whichever block it falls in. The compiled kernels (disttrain.kernels_cpu) take
the same blocks (`row_blocks`) and run them on threads of their own, in C++, without a Python hand-off.

The thread count defaults to what the BLAS is told (DISTTRAIN_NUM_THREADS, else OMP_NUM_THREADS, else
OPENBLAS_NUM_THREADS, else the CPUs this process may run on), so `mpirun` launchers that give each rank
one thread get single-threaded passes too; `set_num_threads` sets both (disttrain.parallel.mpi_job uses it
to share the cores among the ranks of a node). The pools take turns, which needs the BLAS's idle
threads to sleep soon after a GEMM (kernels_cpu/team.cpp, or disttrain/__init__.py's shorter busy-wait).
"""
import os
from concurrent.futures import ThreadPoolExecutor

import threadpoolctl

__all__ = ["get_num_threads", "set_num_threads", "parallel_rows", "row_blocks", "one_blas_thread", "available_cores",
           "user_thread_count", "blas_kernel_note", "MIN_ELEMENTS_PER_THREAD", "THREAD_ENV_VARS"]

MIN_ELEMENTS_PER_THREAD = 1 << 18   # below ~1 MB of float32 per block a hand-off costs more than it saves
THREAD_ENV_VARS = ("DISTTRAIN_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")

_num_threads = None
_pool = None
_pool_size = 0
_blas = None                        # threadpoolctl's controller of the BLAS libraries (found on first use)


def _default_threads():
    return user_thread_count() or available_cores()


def user_thread_count():
    """The thread count the environment asks for (the first of THREAD_ENV_VARS that is set), or None."""
    for var in THREAD_ENV_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"${var} must be a positive integer, got {value!r}") from None
            if n < 1:
                raise ValueError(f"${var} must be a positive integer, got {value!r}")
            return n
    return None


def available_cores():
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                  # not on Linux
        return os.cpu_count() or 1


def get_num_threads():
    """Threads that parallel_rows uses (1: everything runs on the calling thread)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def set_num_threads(n):
    """Use n threads on the CPU: for the elementwise passes here and for the BLAS's GEMMs (as
    torch.set_num_threads does for its intra-op pool; threadpoolctl reaches the BLAS NumPy loaded)."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: expected an int >= 1, got {n!r}")
    _num_threads = n
    _blas_libraries().limit(limits=n)     # kept: a limiter restores the old count only when used as a context


def row_blocks(rows, elements_per_row, min_per_block=MIN_ELEMENTS_PER_THREAD):
    """The contiguous (lo, hi) blocks that cover range(rows), one per thread that is worth its hand-off (see
    parallel_rows); none for rows <= 0. The compiled kernels take these and run them on their own threads."""
    if rows <= 0:
        return []
    threads = min(get_num_threads(), rows, max(1, rows * elements_per_row // min_per_block))
    step = -(-rows // threads)
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def one_blas_thread():
    """A context in which the BLAS runs on one thread (for loops of small GEMMs; see kernels_numpy)."""
    return _blas_libraries().limit(limits=1)


def _blas_libraries():
    """threadpoolctl's controller of the BLAS libraries loaded, found once (a search costs milliseconds;
    setting a thread count through it, microseconds)."""
    global _blas
    if _blas is None:
        _blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    return _blas


def blas_kernel_note(environ=None, cpu_flags=None, kernels=None):
    """A warning line when OPENBLAS_CORETYPE holds the BLAS to AVX2 kernels on an AVX-512 CPU, else None.

    Some machines set OPENBLAS_CORETYPE=Haswell because old OpenBLAS builds misbehave on newer CPUs; a
    current OpenBLAS then runs GEMMs much slower on ptb_small's decoder than with its AVX-512 kernels
    (benchmarks/RESULTS.md). environ, cpu_flags (a set) and kernels (OpenBLAS's architecture names)
    default to this process's.
    """
    environ = os.environ if environ is None else environ
    coretype = environ.get("OPENBLAS_CORETYPE", "").strip()
    if not coretype:
        return None
    cpu_flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if kernels is None:
        kernels = [lib.architecture for lib in _blas_libraries().lib_controllers
                   if lib.internal_api == "openblas" and getattr(lib, "architecture", None)]
    slow = [k for k in kernels if k.lower() in ("haswell", "zen", "sandybridge", "nehalem", "prescott")]
    if "avx512f" not in cpu_flags or not slow:
        return None
    return (f"note: OPENBLAS_CORETYPE={coretype} makes NumPy's OpenBLAS run its {slow[0]} (AVX2 or older) GEMM "
            "kernels on this AVX-512 CPU (large GEMMs took ~1.8x as long on the dev box); unset it unless your "
            "OpenBLAS build needs it")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _pool_for(helpers):
    """The pool, grown when it has fewer than `helpers` threads (it starts them lazily, so shrinking the
    thread count keeps it; the threads it made wait idle)."""
    global _pool, _pool_size
    if _pool is None or _pool_size < helpers:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool_size = max(helpers, available_cores() - 1)
        _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="disttrain-intraop")
    return _pool


def parallel_rows(fn, rows, elements_per_row, min_per_block=MIN_ELEMENTS_PER_THREAD):
    """Call fn(lo, hi) for contiguous row blocks covering range(rows), side by side on the intra-op threads.

    fn must touch only rows lo:hi of its arrays. Small work (under min_per_block elements per block;
    callers whose rows cost more than an elementwise pass per element count their own unit) runs as one
    call on this thread. The calling thread takes the last block itself, then every block whose pool thread
    has not started it yet (that thread's core busy with another process): on a shared machine waiting for
    the scheduler to run that thread can take longer than the block. The blocks are the same either way,
    and so are the results. The first error is raised once every block has finished or been dropped.
    """
    if rows <= 0:
        return
    blocks = row_blocks(rows, elements_per_row, min_per_block)
    if len(blocks) == 1:
        fn(0, rows)
        return
    pool = _pool_for(len(blocks) - 1)
    futures = [pool.submit(fn, lo, hi) for lo, hi in blocks[:-1]]
    error = None
    try:
        fn(*blocks[-1])
    except BaseException as exc:
        error = exc
    for future, block in zip(futures, blocks):   # every block finished before anyone reads the arrays
        try:
            if not future.cancel():
                future.result()
            elif error is None:
                fn(*block)
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
