"""Side-by-side timing: candidates run in interleaved rounds in one process, so machine load
(other processes on a shared 2-core box) hits every candidate alike; the median round is reported."""
import os
import platform
import statistics
import time


def interleaved(candidates, rounds=7, warmup=1, clock=time.perf_counter):
    """candidates: {name: fn() -> units of work done}. Returns {name: median units per second}.

    clock=time.process_time times this process's CPU seconds, blind to waits for a busy machine's cores.
    """
    rates = {name: [] for name in candidates}
    for r in range(warmup + rounds):
        for name, fn in candidates.items():
            start = clock()
            units = fn()
            elapsed = clock() - start
            if r >= warmup:
                rates[name].append(units / elapsed)
    return {name: statistics.median(v) for name, v in rates.items()}


def repeat(step, n):
    """A candidate for interleaved(): step() n times, reporting n units of work."""
    def run():
        for _ in range(n):
            step()
        return n

    return run


def one_thread_each(dt, torch):
    """Every side on one thread (--one-core): disttrain's intra-op and BLAS threads, and torch's when present."""
    dt.set_num_threads(1)
    if torch is not None:
        torch.set_num_threads(1)


def add_one_core_flag(parser):
    """--one-core, for a busy machine: see one_core_clock."""
    parser.add_argument("--one-core", action="store_true",
                        help="every side on one thread, timed by this process's CPU time (busy machines)")


def one_core_clock(args, dt, torch):
    """The clock for interleaved(): with --one-core every side on one thread (one_thread_each) and this process's
    CPU time, blind to waits for a busy machine's cores; else wall time."""
    if args.one_core:
        one_thread_each(dt, torch)
        return time.process_time
    return time.perf_counter


def machine():
    """One line naming the machine, the BLAS settings that change GEMM speed and the GEMM kernels NumPy runs."""
    blas = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS") if k in os.environ}
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
            f", BLAS env {blas or 'unset'}, NumPy's BLAS kernels: {blas_kernels()}")


def blas_kernels():
    """NumPy's BLAS and the CPU kernels it picked (threadpoolctl), e.g. 'openblas 0.3.31 SkylakeX'.

    OPENBLAS_CORETYPE=Haswell (set on some machines for old OpenBLAS builds) makes a current OpenBLAS run
    its AVX2 kernels on an AVX-512 CPU: the decoder's GEMMs then take ~1.8x as long here.
    """
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl reports)
    import threadpoolctl

    libs = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    return ", ".join(f"{lib['internal_api']} {lib['version']} {lib.get('architecture', '?')}" for lib in libs) or "?"


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch
