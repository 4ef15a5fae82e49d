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


def machine():
    """One line naming the machine and the BLAS settings that change GEMM speed."""
    blas = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS") if k in os.environ}
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
            f", BLAS env {blas or 'unset'}")


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch
