"""The decoder's big elementwise passes on 1 thread vs all cores (disttrain.tensor.threads), side by side.

    .venv/bin/python benchmarks/bench_intraop.py [--rows 400] [--vocab 10000] [--rounds 15]

What one ptb_small step does after its decoder GEMM, on (T*B, vocab) = (400, 10000) float32 logits: the
bias add, cross-entropy forward (row max, shift, exp, row sums) and backward (scaling in place). The
GEMMs keep the BLAS's own thread count on both sides; only the intra-op thread count changes. Prints
the median time of each side and the speed-up (comparator: the same kernels on one thread; ideal =
the core count). Run it on a quiet machine.
"""
import argparse

import numpy as np
from harness import interleaved, machine

from disttrain.tensor import kernels_numpy, threads


def passes(rows, vocab, seed=0):
    rng = np.random.default_rng(seed)
    out = rng.standard_normal((rows, vocab)).astype(np.float32)
    bias = rng.standard_normal(vocab).astype(np.float32)
    target = rng.integers(0, vocab, rows)
    row_scale = np.full(rows, 1.0 / rows, np.float32)

    def run():
        kernels_numpy.add_bias_(np, out, bias)
        _, saved = kernels_numpy.cross_entropy_forward(np, out, target, -100, keep_softmax=True)
        kernels_numpy.cross_entropy_backward(np, out, target, saved, row_scale)
        np.subtract(out, bias, out=out)  # undo the add: every round sees the same numbers
        return 1

    return run


def on_threads(n, run):
    def timed():
        threads.set_num_threads(n)
        return run()
    return timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    cores = threads.available_cores()
    print(f"machine: {machine()}; intra-op threads: 1 vs {cores}")
    run = passes(args.rows, args.vocab)
    rates = interleaved({"1 thread": on_threads(1, run), f"{cores} threads": on_threads(cores, run)},
                        rounds=args.rounds, warmup=3)
    one, many = 1e3 / rates["1 thread"], 1e3 / rates[f"{cores} threads"]
    print(f"bias add + cross-entropy forward/backward on ({args.rows}, {args.vocab}) float32: "
          f"1 thread {one:.2f} ms, {cores} threads {many:.2f} ms: {one / many:.2f}x (ideal {cores}x)")


if __name__ == "__main__":
    main()
