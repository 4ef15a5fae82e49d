"""threads.parallel_rows with and without the calling thread taking over blocks whose pool thread has not
started them: the three multi-tensor passes of a ptb_small clip + SGD step (norms, scale_, foreach_sgd_step)
on 2 intra-op threads, the two versions alternating call by call in one process (wall time).

    .venv/bin/python benchmarks/bench_block_takeover.py [--rounds 300]

On a quiet machine both are the same; where another process holds a core, the pool thread may wait for the
scheduler longer than its block takes, and the version without takeover waits for it: the mean and the 90th
percentile show those waits, the median mostly not.
"""
import argparse
import os
import time

import disttrain as dt  # first, as in `disttrain run`: it sets OpenBLAS's idle-thread wait before NumPy loads it
import numpy as np

from disttrain.kernels_cpu import wrappers
from disttrain.tensor import threads

PTB_SMALL_SHAPES = [(10000, 200), (800, 200), (800, 200), (800,), (800,), (800, 200), (800, 200), (800,), (800,),
                    (10000, 200), (10000,)]


def without_takeover(fn, rows, elements_per_row, min_per_block=threads.MIN_ELEMENTS_PER_THREAD):
    """parallel_rows as it was: the calling thread runs its block, then waits for every other one."""
    blocks = threads._blocks(rows, elements_per_row, min_per_block)
    if len(blocks) == 1:
        fn(0, rows)
        return
    futures = [threads._pool_for(len(blocks) - 1).submit(fn, lo, hi) for lo, hi in blocks[:-1]]
    try:
        fn(*blocks[-1])
    finally:
        for future in futures:
            future.result()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    dt.set_num_threads(2)
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in PTB_SMALL_SHAPES]
    grads = [rng.standard_normal(s).astype(np.float32) for s in PTB_SMALL_SHAPES]
    versions = {"with takeover": threads.parallel_rows, "without takeover": without_takeover}
    times = {name: [] for name in versions}
    load_before = os.getloadavg()[0]
    try:
        for _ in range(args.rounds):
            for name, version in versions.items():
                threads.parallel_rows = version
                start = time.perf_counter()
                wrappers.norms(np, grads, 2.0)
                wrappers.scale_(np, grads, 1.0)
                wrappers.foreach_sgd_step(np, params, grads, [None] * len(params), 1.0)
                times[name].append(time.perf_counter() - start)
    finally:
        threads.parallel_rows = versions["with takeover"]
    print(f"norms + scale_ + foreach_sgd_step, ptb_small's {len(params)} float32 tensors, 2 threads, "
          f"{args.rounds} alternating rounds")
    for name, t in times.items():
        ms = np.array(t) * 1e3
        print(f"  {name:17s} median {np.median(ms):.3f} ms   mean {ms.mean():.3f} ms   90th percentile "
              f"{np.percentile(ms, 90):.3f} ms")
    print(f"  load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
