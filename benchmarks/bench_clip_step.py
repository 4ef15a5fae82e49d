"""Gradient clipping + the optimizer step of a job's model: the compiled multi-tensor kernels (one pass over all
tensors for the norms, one for the scaling, one for the SGD update) vs the per-array reference kernels
(kernels_numpy: one pass per tensor, what the CPU backend ran before the multi-tensor kernels), side by side.

    .venv/bin/python benchmarks/bench_clip_step.py [--job jobs/ptb_small.toml] [--steps 20] [--rounds 9]

A step is `clip_grad_norm_(params, max_norm)` then `optimizer.step()` on the job's LSTM LM (its parameters,
optimizer and hyper-parameters; the gradients random), with max_norm just under the gradients' norm so that
every step scales them (and the norm shrinks by 1e-4 per step instead of vanishing). Each kernel table runs on
1 thread (timed by this process's CPU time, which other processes on a shared machine disturb far less) and on
2 threads (wall time), in interleaved rounds (median); PyTorch's clip_grad_norm_ + its optimizer (its CPU
defaults) alongside where it is installed.
"""
import argparse
import os
import time

import disttrain as dt  # first, as in `disttrain run`: it sets OpenBLAS's idle-thread wait before NumPy loads it
import numpy as np
from bench_lm_speed import MODELS, optimizer_of
from harness import interleaved, machine, torch_or_none

from disttrain.kernels_cpu import wrappers
from disttrain.tensor import backend, kernels_numpy
from disttrain.train import load_job

TABLES = {"compiled multi-tensor": wrappers, "per-array reference": kernels_numpy}


def with_gradients(params, seed=0):
    rng = np.random.default_rng(seed)
    for p in params:
        p.grad = dt.tensor((rng.standard_normal(p.shape) * 0.01).astype(p.dtype))


def ours(spec, vocab, table, n_threads, steps):
    dt.manual_seed(0)
    model = MODELS[spec.model.kind][0](spec, vocab)
    params = list(model.parameters())
    with_gradients(params)
    optimizer = optimizer_of(dt, spec, params)
    max_norm = [dt.nn.utils.clip_grad_norm_(params, float("inf"))]

    def run():
        backend.CPU.kernels = table
        dt.set_num_threads(n_threads)
        for _ in range(steps):
            max_norm[0] = 0.9999 * dt.nn.utils.clip_grad_norm_(params, max_norm[0])
            optimizer.step()
        return steps

    return run, sum(p.numel() for p in params), len(params)


def theirs(torch, spec, vocab, n_threads, steps):
    torch.manual_seed(0)
    model = MODELS[spec.model.kind][1](torch, spec, vocab)
    params = list(model.parameters())
    rng = np.random.default_rng(0)
    for p in params:
        p.grad = torch.tensor((rng.standard_normal(tuple(p.shape)) * 0.01).astype(np.float32))
    optimizer = optimizer_of(torch, spec, params)
    max_norm = [float(torch.nn.utils.clip_grad_norm_(params, float("inf")))]

    def run():
        torch.set_num_threads(n_threads)
        for _ in range(steps):
            max_norm[0] = 0.9999 * float(torch.nn.utils.clip_grad_norm_(params, max_norm[0]))
            optimizer.step()
        return steps

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/ptb_small.toml")
    parser.add_argument("--vocab", type=int, default=10_000, help="the model's vocabulary (PTB's: 10,000)")
    parser.add_argument("--steps", type=int, default=20, help="clip + step per timed round")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    spec = load_job(args.job)
    if spec.model.kind != "lstm_lm":
        raise SystemExit(f"bench_clip_step builds the LSTM LM; {args.job} has a {spec.model.kind!r} model")
    torch = torch_or_none()
    before_table, before_threads = backend.CPU.kernels, dt.get_num_threads()
    load_before = os.getloadavg()[0]
    results = {}
    try:
        for n_threads, clock in ((1, time.process_time), (2, time.perf_counter)):
            candidates = {}
            for name, table in TABLES.items():
                candidates[name], numel, count = ours(spec, args.vocab, table, n_threads, args.steps)
            if torch is not None:
                candidates["pytorch"] = theirs(torch, spec, args.vocab, n_threads, args.steps)
            results[n_threads] = interleaved(candidates, rounds=args.rounds, clock=clock)
    finally:
        backend.CPU.kernels = before_table
        dt.set_num_threads(before_threads)
    load_after = os.getloadavg()[0]

    print(f"clip_grad_norm_ + {spec.optim.kind} step, {args.job}: {count} float32 tensors, {numel:,} elements, "
          f"lr {spec.optim.lr}, momentum {spec.optim.momentum}, weight_decay {spec.optim.weight_decay}; {machine()}")
    for n_threads, rates in results.items():
        clock = "CPU time" if n_threads == 1 else "wall time"
        base = rates["per-array reference"]
        for name, rate in rates.items():
            print(f"  {n_threads} thread{'s' if n_threads > 1 else ' '} ({clock:9s}) {name:22s} {1e3 / rate:6.2f} ms"
                  f"   {rate / base:.2f}x the per-array reference")
    print(f"  load average (1 min) {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
