"""Autograd overhead per op on tiny tensors, disttrain vs PyTorch, side by side.

A graph of N elementwise ops on 4x4 float32 tensors (each op's input feeds the next, and a
shared weight feeds every op, so gradients also accumulate), then backward. Reports
microseconds per op for forward, backward and both, and the ratio ours / PyTorch
(target: ratio <= 1.3). On a busy machine `--one-core` times both sides on one thread by
this process's CPU time, which other processes disturb far less than wall time.

    python benchmarks/bench_autograd_overhead.py [--ops 100] [--graphs 50] [--rounds 7] [--one-core]
"""
import argparse
import os
import statistics

import disttrain as dt
from harness import add_one_core_flag, machine, one_core_clock, torch_or_none

TARGET_RATIO = 1.3


def build_and_backward(lib, ops, graphs, clock):
    """Returns (forward seconds, backward seconds) for `graphs` graphs of `ops` ops."""
    a = lib.ones(4, 4, requires_grad=True)
    w = lib.ones(4, 4, requires_grad=True)
    fwd = bwd = 0.0
    for _ in range(graphs):
        start = clock()
        z = a
        for i in range(ops // 4):
            z = ((z * w) + w).tanh() - 0.5
        loss = z.sum()
        mid = clock()
        loss.backward()
        fwd += mid - start
        bwd += clock() - mid
    return fwd, bwd


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=100, help="ops per graph (multiple of 4)")
    parser.add_argument("--graphs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    add_one_core_flag(parser)
    args = parser.parse_args()
    libs = {"disttrain": dt}
    torch = torch_or_none()
    if torch is not None:
        libs["pytorch"] = torch
    clock = one_core_clock(args, dt, torch)
    load_before = os.getloadavg()[0]
    samples = {name: [] for name in libs}
    for r in range(args.rounds + 1):
        for name, lib in libs.items():
            f, b = build_and_backward(lib, args.ops, args.graphs, clock)
            if r:  # the first round warms up
                samples[name].append((f, b))
    load_after = os.getloadavg()[0]
    n = args.ops // 4 * 4 * args.graphs + args.graphs  # + the final sum per graph
    print(f"autograd overhead, 4x4 float32 tensors, {args.ops}-op graphs; {machine()}")
    per_op = {}
    for name, runs in samples.items():
        f = statistics.median(s[0] for s in runs) / n * 1e6
        b = statistics.median(s[1] for s in runs) / n * 1e6
        per_op[name] = f + b
        print(f"  {name:10s} forward {f:6.2f} us/op   backward {b:6.2f} us/op   total {f + b:6.2f} us/op")
    if "pytorch" in per_op:
        print(f"  ratio disttrain / pytorch = {per_op['disttrain'] / per_op['pytorch']:.2f}x  "
              f"(target <= {TARGET_RATIO})")
    print(f"  load average (1 min) {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} cores"
          + ("; one thread per side, CPU time" if args.one_core else "; wall time"))


if __name__ == "__main__":
    main()
